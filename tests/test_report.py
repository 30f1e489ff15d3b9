"""bnfree_jax.report on tiny run directories written the way the trainer writes them."""

import json
import math
import types

import matplotlib.colors
import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from bnfree_jax import logs, report

FIGURES = ('loss', 'accuracy', 'grad_histograms', 'grad_histogram_layer', 'schedules', 'grad_norms')


def _write_run(run_dir, config, scalars, hists=()):
  """scalars: [(step, {tag: value})]; hists: [(step, {tag: samples})]."""
  run_dir.mkdir()
  (run_dir / 'config.json').write_text(json.dumps(config))
  writer = logs.Writer(str(run_dir))
  for step, values in scalars:
    writer.write_scalars(step, values)
  for step, arrays in hists:
    writer.write_histograms(step, arrays)
  writer.close()
  return run_dir


def _config(**paper):
  config = dict(dataset='cifar10', batch_size=500, num_epochs=4, num_train_steps=-1,
                model=dict(name='resnet18', norm='weight', dropout_rate=0.1),
                lr_schedule=dict(name='linear', base_lr=0.017, warmup_epochs=1.0),
                grad_clip=dict(mode='log', threshold=5.0, final_threshold=50.0))
  if paper:
    config['paper'] = dict(table='5', row='non-BN with adaptive clipping & dropout', **paper)
  return config


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp('runs')
  rng = np.random.default_rng(0)
  # With paper numbers; train/epoch logged (100 steps per epoch); resumed at
  # step 200, so the first attempt's eval at 300 (top-1 0.99) is stale.
  wn = [(s, {'train/loss': 2.0 / s * 100, 'train/top1': t, 'train/epoch': s / 100,
             'train/learning_rate': 0.017 * s / 100, 'train/grad_norm': 8.0 / s * 100,
             'train/clip_threshold': 5.0 * 10 ** (s / 400),
             'perf/seconds_per_epoch': sec, 'perf/images_per_sec': img,
             'perf/peak_memory_gb': mem})
        for s, t, sec, img, mem in [(100, 0.30, 1000.0, 10.0, 1.5), (200, 0.55, 60.0, 100.0, 2.25),
                                    (300, 0.70, 62.0, 200.0, 2.0), (400, 0.7234, 70.0, 300.0, 2.0)]]
  order = [wn[0], (100, {'eval/loss': 1.5, 'eval/top1': 0.40}), wn[1],
           (200, {'eval/loss': 1.2, 'eval/top1': 0.6125}), wn[2],
           (300, {'eval/loss': 1.3, 'eval/top1': 0.99}),
           # Resumed from step 200: step 300 is logged again.
           wn[2], (300, {'eval/loss': 1.3, 'eval/top1': 0.58}), wn[3],
           (400, {'eval/loss': 1.25, 'eval/top1': 0.5875})]
  hists = [(s, {'grad_log10_magnitude/stage2': rng.normal(-3 + s / 400, 0.5, 2000),
                'grad_log10_magnitude/stage1': rng.normal(-2, 0.5, 2000)})
           for s in range(0, 400, 50)]
  wn_config = {**_config(train_top1=74.7, val_top1=65.1), 'dataset': 'imagenet2012'}
  wn_dir = _write_run(root / 'r18_wn', wn_config, order, hists)

  # No paper section, loss NaN at the end, minutes per epoch.
  bn = [(s, {'train/loss': loss, 'train/top1': 0.2 * s / 100, 'train/learning_rate': 0.1,
             'train/epoch': s / 100,
             'train/grad_norm': 1.0, 'perf/seconds_per_epoch': sec,
             'perf/images_per_sec': 50.0, 'perf/peak_memory_gb': 7.0})
        for s, loss, sec in [(100, 2.3, 5000.0), (200, 2.0, 300.0), (300, 1.9, 330.0),
                             (350, float('nan'), 360.0)]]
  bn += [(200, {'eval/loss': 2.1, 'eval/top1': 0.25})]
  bn_config = _config()
  bn_config['model'].update(norm='batch', dropout_rate=0.0)
  bn_config['grad_clip'] = dict(mode='none')
  bn_hists = [(s, {'grad_log10_magnitude/stage2': rng.normal(-4, 0.3, 2000)})
              for s in range(0, 300, 100)]
  bn_dir = _write_run(root / 'r18_bn', bn_config, sorted(bn, key=lambda p: p[0]), bn_hists)

  # Just started: one train point, no eval, no histograms.
  new_dir = _write_run(root / 'r18_new', _config(train_top1=None, val_top1=64.7),
                       [(10, {'train/loss': 6.9, 'train/top1': 0.001, 'train/epoch': 0.1})])
  out = root / 'out' / 'nested'
  path = report.write_report([str(wn_dir), str(bn_dir), str(new_dir)], str(out))
  return dict(wn=wn_dir, bn=bn_dir, new=new_dir, out=out, path=path,
              text=open(path).read())


def _row(text, name):
  rows = [line for line in text.splitlines() if line.startswith(f'| {name} |')]
  assert len(rows) == 2, rows  # Results table and time/memory table.
  return [[c.strip() for c in r.strip('|').split('|')] for r in rows]


def test_load_run_reads_scalars_histograms_and_resumes(runs):
  run = report.load_run(str(runs['wn']))
  steps, top1 = run.scalars['eval/top1']
  np.testing.assert_array_equal(steps, [100, 200, 300, 400])
  np.testing.assert_allclose(top1, [0.40, 0.6125, 0.58, 0.5875], rtol=1e-6)  # 0.99 purged.
  assert run.steps_per_epoch == 100  # From train/epoch.
  step, hist = run.hists['grad_log10_magnitude/stage2'][0]
  assert step == 0 and hist.shape[1] == 3 and hist[:, 2].sum() == 2000
  bn = report.load_run(str(runs['bn']))
  assert bn.steps_per_epoch == 100
  assert math.isnan(bn.scalars['train/loss'][1][-1])


def test_results_table(runs):
  text = runs['text']
  assert 'paper train / val' in text
  wn, _ = _row(text, 'r18_wn')
  assert wn[1:7] == ['resnet18', 'weight', 'linear 0.017, warm-up 1 ep', 'log 5→50', '0.1',
                     '400 / 4.00']
  assert wn[7] == '72.34 / 72.34'
  assert wn[8] == '58.75 / 61.25'      # Final / best validation top-1.
  assert wn[9] == '+13.59'             # Train - val, final: 72.34 - 58.75.
  assert wn[10] == '74.70 / 65.10'     # Paper train / val.
  assert wn[11] == '+9.60'             # 74.70 - 65.10.
  assert wn[12] == '-6.35'             # 58.75 - 65.10.
  bn, _ = _row(text, 'r18_bn')
  assert bn[2] == 'batch' and bn[4] == 'none'
  assert bn[8] == '25.00 / 25.00' and bn[10] == '— / —' and bn[11:13] == ['—', '—']
  assert 'diverged: train/loss not finite at step 350' in bn[13]
  assert 'unfinished: 350 of 400 steps' in bn[13]
  new, _ = _row(text, 'r18_new')
  assert new[6] == '10 / 0.10' and new[8] == '— / —' and new[9] == '—'
  assert new[10:12] == ['— / 64.70', '—'] and 'no eval yet' in new[13]


def test_delta_to_the_paper_only_on_the_papers_dataset(runs):
  wn = report.load_run(str(runs['wn']))
  twin = wn._replace(name='twin', config={**wn.config, 'dataset': 'fashion_mnist'})
  row = [c.strip() for c in report._results_table([twin]).splitlines()[-1].strip('|').split('|')]
  assert row[8:13] == ['58.75 / 61.25', '+13.59', '74.70 / 65.10', '+9.60', '—']


def test_perf_table_excludes_first_point(runs):
  _, wn = _row(runs['text'], 'r18_wn')
  # Medians of [60, 62, 70] and [100, 200, 300]; with the first point they would be 61, 150.
  assert wn[3:6] == ['62.0 s', '200', '2.25']
  _, bn = _row(runs['text'], 'r18_bn')
  assert bn[3:6] == ['5.5 min', '50', '7.00']  # Median 330 s of [300, 330, 360].
  _, new = _row(runs['text'], 'r18_new')
  assert new[3:6] == ['—', '—', '—']


def test_figures_are_pngs_linked_from_report(runs):
  for name in FIGURES:
    data = (runs['out'] / f'{name}.png').read_bytes()
    assert data[:8] == b'\x89PNG\r\n\x1a\n' and len(data) > 1024, name
    assert f']({name}.png)' in runs['text']


@pytest.fixture(scope='module')
def figures(runs, tmp_path_factory):
  """(wn run, bn run, their figures), the heatmaps of stage1 rather than the
  default stage2."""
  wn, bn = (report.load_run(str(runs[name])) for name in ('wn', 'bn'))
  out = tmp_path_factory.mktemp('figures')
  return wn, bn, report.write_figures([wn, bn], str(out), hist_stage='stage1')


def test_heatmap_columns_are_the_logged_histograms_of_the_stage_asked_for(figures):
  wn, bn, figs = figures
  wn_ax, bn_ax = figs['grad_histograms'].axes[:2]
  (mesh,) = wn_ax.collections
  counts, corners = np.ma.getdata(mesh.get_array()), np.ma.getdata(mesh.get_coordinates())
  logged = wn.hists['grad_log10_magnitude/stage1']
  # A column per logged histogram, centred on its epoch (100 steps each) ...
  x = corners[0, :, 0]
  np.testing.assert_allclose((x[1:] + x[:-1]) / 2, [step / 100 for step, _ in logged])
  # ... holding all its samples, spread over the common bins ...
  np.testing.assert_allclose(counts.sum(axis=0), [h[:, 2].sum() for _, h in logged])
  np.testing.assert_allclose(counts.sum(axis=0), 2000)
  # ... of stage1 (mean -2 throughout), not stage2 (mean -3 + step / 400).
  y = corners[:, 0, 1]
  means = ((y[1:] + y[:-1]) / 2) @ counts / counts.sum(axis=0)
  np.testing.assert_allclose(means, -2.0, atol=0.05)
  assert not bn_ax.collections  # The BN run logged stage2 only, and says so.
  assert [t.get_text() for t in bn_ax.texts] == ['no stage1 histograms\n(logged: stage2)']


def test_curves_are_the_logged_points(figures):
  wn, bn, figs = figures
  (wn_val,), (bn_val,) = (
      [line for line in figs['accuracy'].axes[1].lines if line.get_color() == color]
      for color in (report._color(0), report._color(1)))
  # Epochs on x; the abandoned attempt's 99% at step 300 is not drawn.
  np.testing.assert_allclose(wn_val.get_xdata(), [1, 2, 3, 4])
  np.testing.assert_allclose(wn_val.get_ydata(), [40, 61.25, 58, 58.75], rtol=1e-6)
  np.testing.assert_allclose(bn_val.get_ydata(), [25.0], rtol=1e-6)
  bn_loss = figs['loss'].axes[0].lines[1]
  np.testing.assert_allclose(bn_loss.get_xdata(), [1, 2, 3, 3.5])
  np.testing.assert_allclose(bn_loss.get_ydata(), [2.3, 2.0, 1.9, np.nan], rtol=1e-6)  # A gap.

  # The run's threshold, solid; the other log shape, dotted, per epoch; none
  # for the BN run, which logged no threshold.
  threshold = [5.0 * 10 ** (s / 400) for s in (100, 200, 300, 400)]
  solid, dotted = figs['schedules'].axes[1].lines
  assert (solid.get_linestyle(), dotted.get_linestyle()) == ('-', ':')
  np.testing.assert_allclose(solid.get_ydata(), threshold, rtol=1e-6)
  np.testing.assert_allclose(dotted.get_xdata(), [0, 1, 2, 3, 4])
  np.testing.assert_allclose(dotted.get_ydata(), report._other_clip_shape(wn, 'epoch')[1])
  norm, dashed, bn_norm = figs['grad_norms'].axes[0].lines
  np.testing.assert_allclose(norm.get_ydata(), [8.0, 4.0, 8 / 3, 2.0], rtol=1e-6)
  assert dashed.get_linestyle() == '--'
  np.testing.assert_allclose(dashed.get_ydata(), threshold, rtol=1e-6)
  assert bn_norm.get_color() == report._color(1)


def test_twenty_runs_get_twenty_colours_the_first_ten_matplotlibs_own():
  colors = [report._color(i) for i in range(20)]
  assert len(set(colors)) == 20
  assert colors[:10] == [matplotlib.colors.to_rgba(f'C{i}') for i in range(10)]


@pytest.mark.parametrize('ncols', [1, 2])
def test_a_long_legend_stays_inside_its_figure(ncols):
  runs = [types.SimpleNamespace(name=f't6_r50_wn_monotonic_lowdata_{i}') for i in range(18)]
  fig, _ = report._figure(runs, ncols)
  FigureCanvasAgg(fig).draw()
  box, (legend,) = fig.bbox, fig.legends
  inside = legend.get_window_extent()
  assert box.x0 <= inside.x0 and inside.x1 <= box.x1 and box.y0 <= inside.y0, (inside, box)
  assert len(legend.get_texts()) == 18


@pytest.mark.parametrize('mode,want', [
    # The run's 'log' (geometric) drawn against 5 + 45 ln(1 + epoch) / ln 4 ...
    ('log', [5.0, 27.5, 5 + 45 * math.log(3) / math.log(4), 50.0, 50.0]),
    # ... and a 'log_curve' run against 5 x 10^(epoch / 3).
    ('log_curve', [5.0, 5 * 10 ** (1 / 3), 5 * 10 ** (2 / 3), 50.0, 50.0]),
])
def test_schedules_figure_draws_the_other_log_shape(runs, mode, want):
  wn = report.load_run(str(runs['wn']))
  run = wn._replace(config={**wn.config, 'grad_clip': {**wn.config['grad_clip'], 'mode': mode}})
  x, threshold = report._other_clip_shape(run, 'epoch')
  np.testing.assert_allclose(x, [0, 1, 2, 3, 4])  # Epoch starts, then the end.
  np.testing.assert_allclose(threshold, want, rtol=1e-6)
  np.testing.assert_allclose(report._other_clip_shape(run, 'step')[0], [0, 100, 200, 300, 400])
  assert report._other_clip_shape(report.load_run(str(runs['bn'])), 'epoch') is None


def test_main_prints_path_and_other_stage(runs, tmp_path, capsys):
  assert report.main([str(runs['wn']), '--out', str(tmp_path), '--hist-stage', 'stage1']) == 0
  assert str(tmp_path / 'report.md') in capsys.readouterr().out
  assert 'stage1' in (tmp_path / 'report.md').read_text()


@pytest.mark.parametrize('make', ['missing', 'empty'])
def test_bad_run_dir_exits_2(runs, tmp_path, capsys, make):
  bad = tmp_path / 'nope'
  if make == 'empty':
    bad.mkdir()
  assert report.main([str(runs['wn']), str(bad), '--out', str(tmp_path / 'out')]) == 2
  err = capsys.readouterr().err
  assert str(bad) in err and len(err.strip().splitlines()) == 1
  assert not (tmp_path / 'out').exists()


def test_planned_length_from_float32_epochs():
  """train/epoch is logged in float32, so 600 / float32(600 / 468) is a
  little under 468: the planned 2 epochs must still read 936 steps, not 935."""
  epoch = np.float32(600 / 468)
  scalars = {logs.EPOCH: (np.array([600.0]), np.array([epoch], np.float64)),
             'train/loss': (np.array([700.0]), np.array([1.0]))}
  run = report.Run('r', {'num_epochs': 2, 'num_train_steps': -1}, scalars, {},
                   report._steps_per_epoch(scalars))
  assert run.steps_per_epoch < 468 and report._total_steps(run) == 936
  assert report._progress_cells(run)[1] == 'no eval yet; unfinished: 700 of 936 steps'


def _short_points(steps, per_epoch, eval_at=()):
  """What the trainer logs every 10 steps, and eval where asked."""
  points = [(s, {'train/loss': 2.3 - s / 100, 'train/top1': s / 100, 'train/epoch': s / per_epoch,
                 'train/learning_rate': 0.1, 'train/grad_norm': 3.0,
                 'train/clip_threshold': 5.0, 'perf/seconds_per_epoch': 30.0})
            for s in steps]
  return points + [(s, {'eval/loss': 1.4, 'eval/top1': 0.48}) for s in eval_at]


_HIST = [(0, {'grad_log10_magnitude/stage2': np.linspace(-4, -2, 100)})]

# name: (config overrides, scalar points, histogram points, progress cells).
SHAPES = {
    # configs/fashion_mnist.py --config.num_train_steps=40: 40 of 468 steps,
    # so its 'log' clip schedule is one epoch's constant.
    'shorter_than_an_epoch': (dict(num_train_steps=40), _short_points(range(10, 41, 10), 468, [40]),
                              _HIST, ('40 / 0.09', '')),
    'no_eval': (dict(num_train_steps=40), _short_points(range(10, 41, 10), 468), (),
                ('40 / 0.09', 'no eval yet')),
    'in_progress': ({}, _short_points(range(10, 151, 10), 100, [100]), _HIST,
                    ('150 / 1.50', 'unfinished: 150 of 400 steps')),
    'no_epoch_logged': (dict(num_train_steps=40), [(10, {'train/loss': 2.0})], (),
                        ('10 / ?', 'no eval yet; unfinished: 10 of 40 steps')),
    'histograms_only': ({}, [], _HIST, ('0 / ?', 'no eval yet')),
}


@pytest.mark.parametrize('shape', SHAPES)
def test_any_run_that_logged_something_is_reported(tmp_path, capsys, shape):
  overrides, scalars, hists, cells = SHAPES[shape]
  run_dir = _write_run(tmp_path / shape, {**_config(), **overrides}, scalars, hists)
  assert report.main([str(run_dir), '--out', str(tmp_path / 'out')]) == 0, capsys.readouterr().err
  row, _ = _row((tmp_path / 'out' / 'report.md').read_text(), shape)
  assert (row[6], row[-1]) == cells
  for name in FIGURES:
    assert (tmp_path / 'out' / f'{name}.png').stat().st_size > 1024, name


def test_other_log_shape_of_a_run_shorter_than_an_epoch_ends_with_it(tmp_path):
  _, scalars, _, _ = SHAPES['shorter_than_an_epoch']
  config = {**_config(), 'num_train_steps': 40}
  run = report.load_run(str(_write_run(tmp_path / 'r', config, scalars)))
  x, threshold = report._other_clip_shape(run, 'step')
  np.testing.assert_allclose(x, [0, 40])
  np.testing.assert_allclose(threshold, [5.0, 5.0])  # One epoch: the first threshold.
