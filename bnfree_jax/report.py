"""Markdown report with figures for one or more training runs.

  python -m bnfree_jax.report runs/r18_bn runs/r18_wn --out reports/r18 [--hist-stage stage2]

Reads each run's TensorBoard event files and config.json and writes DIR/report.md:
a results table (next to the paper's numbers where config.json has a `paper`
section), a time/memory table like the paper's Table 7, and PNG figures like
its Figs. 2-9. Unfinished or diverged runs are reported with what they logged.
"""

import argparse
import math
import os
import sys
from typing import NamedTuple

import matplotlib
import ml_collections
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from bnfree_jax import logs, optim, workdir as workdirs

_DPI = 110
HIST_LAYER = 'stage2_block1.conv2'  # configs/default.py's histogram_layer, as tagged.
# File stem -> caption in report.md; {stage} is --hist-stage.
_FIGURES = {
    'loss': 'Training and validation loss (paper Figs. 2, 4-8)',
    'accuracy': 'Training and validation top-1 (paper Figs. 4-8)',
    'grad_histograms': 'Gradient magnitudes of {stage} over training (paper Fig. 3)',
    'grad_histogram_layer': 'Gradient magnitudes of the layer {layer} over training '
                            "(paper Fig. 3: ResNet-18's ninth layer)",
    'schedules': 'Learning rate and clipping threshold (paper Fig. 9; dotted: the '
                 "threshold's other log shape, grad_clip.mode log vs log_curve)",
    'grad_norms': 'Gradient global norm and clipping threshold',
}


# Published DP-SGD results at delta = 1e-5, drawn beside the runs' in the
# privacy-utility figure: dataset -> (who, epsilon, test top-1 %).
PUBLISHED_DP = {
    'fashion_mnist': (('Papernot et al. 2021, tempered-sigmoid CNN', 2.93, 86.1),
                      ('Tramèr & Boneh 2021, ScatterNet + linear', 3.0, 89.7)),
}


class ReportError(ValueError):
  """A run directory that cannot be reported."""


class Run(NamedTuple):
  name: str
  config: dict
  scalars: dict  # tag -> (steps, values): float arrays in step order.
  hists: dict    # tag -> [(step, [k, 3] array of left edge, right edge, count)].
  steps_per_epoch: float | None


def _check_run_dir(run_dir):
  if not os.path.isdir(run_dir):
    raise ReportError(f'run directory {run_dir} does not exist')
  if not any(f.startswith('events.out.tfevents.') for f in os.listdir(run_dir)):
    raise ReportError(f'run directory {run_dir} has no TensorBoard event files')


def _histogram(proto):
  """[k, 3] (left edge, right edge, count) of a HistogramProto (tensorboardX)."""
  right = np.asarray(proto.bucket_limit, float)
  left = np.concatenate([[proto.min], right[:-1]])
  return np.stack([left, right, np.asarray(proto.bucket, float)], axis=1)


def _tag_points(acc):
  """{tag: (is_histogram, [(step, value)])} of the trainer's events (written
  with tensorboardX) and of older runs' (tf.summary tensor summaries)."""
  tags = acc.Tags()
  points = {t: (False, [(e.step, e.value) for e in acc.Scalars(t)]) for t in tags['scalars']}
  points.update({t: (True, [(e.step, _histogram(e.histogram_value))
                            for e in acc.Histograms(t)]) for t in tags['histograms']})
  for t in tags['tensors']:
    histogram = acc.SummaryMetadata(t).plugin_data.plugin_name == 'histograms'
    points[t] = (histogram, [(e.step, tensor_util.make_ndarray(e.tensor_proto))
                             for e in acc.Tensors(t)])
  return points


def _steps_per_epoch(scalars):
  if logs.EPOCH in scalars:
    steps, epochs = scalars[logs.EPOCH]
    if (epochs > 0).any():
      return float(np.median(steps[epochs > 0] / epochs[epochs > 0]))
  return None  # Nothing logged yet: figures fall back to steps.


def load_run(run_dir) -> Run:
  """Every scalar and histogram tag of a run directory, and its config."""
  _check_run_dir(run_dir)
  # 0 keeps every point.
  acc = event_accumulator.EventAccumulator(run_dir, size_guidance={
      event_accumulator.TENSORS: 0, event_accumulator.SCALARS: 0,
      event_accumulator.HISTOGRAMS: 0})
  acc.Reload()
  scalars, hists = {}, {}
  for tag, (histogram, points) in _tag_points(acc).items():
    steps, values = zip(*logs.keep_last_run(points)) if points else ((), ())
    if histogram:
      # Buckets with non-finite edges (log10 of a zero gradient) cannot be drawn.
      finite = [(s, h[np.isfinite(h).all(axis=1)]) for s, h in zip(steps, values)]
      hists[tag] = [(s, h) for s, h in finite if len(h)]
    else:
      scalars[tag] = (np.asarray(steps, float), np.asarray(values, float).reshape(-1))
  try:
    config = workdirs.read_config(run_dir) or {}
  except workdirs.InputError as e:
    raise ReportError(str(e)) from None
  name = os.path.basename(os.path.normpath(run_dir))
  return Run(name, config, scalars, hists, _steps_per_epoch(scalars))


# ---------------------------------------------------------------- tables ----


def _get(config, dotted, default='?'):
  return workdirs.lookup(config, dotted, default)


def _last(run, tag):
  return run.scalars[tag][1][-1] if tag in run.scalars else None


def _best(run, tag):
  values = run.scalars.get(tag, (None, np.array([np.nan])))[1]
  return np.nanmax(values) if np.isfinite(values).any() else None


def _fmt(value, scale=1.0, digits=2, sign=''):
  if value is None:
    return '—'
  return f'{scale * value:{sign}.{digits}f}' if math.isfinite(value) else 'NaN'


def _markdown(rows):
  return '\n'.join('| ' + ' | '.join(map(str, r)) + ' |'
                   for r in [rows[0], ['---'] * len(rows[0])] + rows[1:])


def _lr_cell(config):
  name, lr = _get(config, 'lr_schedule.name'), _get(config, 'lr_schedule.base_lr', None)
  warmup = _get(config, 'lr_schedule.warmup_epochs', 0)
  cell = name if lr is None else f'{name} {lr:g}'
  return cell + (f', warm-up {warmup:g} ep' if warmup else '')


def _clip_cell(config):
  mode, threshold = _get(config, 'grad_clip.mode'), _get(config, 'grad_clip.threshold')
  if mode == 'constant':
    return f'constant {threshold:g}'
  if mode in ('log', 'log_curve'):
    return f'{mode} {threshold:g}→{_get(config, "grad_clip.final_threshold"):g}'
  if mode == 'agc':
    return f'agc {_get(config, "grad_clip.agc_clipping"):g}'
  return mode


def _total_steps(run):
  """The run's planned length, as the trainer computes it; 0 when unknown."""
  total = _get(run.config, 'num_train_steps', -1)
  if total <= 0 and run.steps_per_epoch:
    # round: steps_per_epoch comes from epochs logged in float32 (467.99...).
    total = round(_get(run.config, 'num_epochs', 0) * run.steps_per_epoch)
  return max(total, 0)


def _progress_cells(run):
  """'steps / epochs' and notes on what the run is missing or did wrong."""
  done = max((int(s[-1]) for s, _ in run.scalars.values() if len(s)), default=0)
  epochs = f'{done / run.steps_per_epoch:.2f}' if run.steps_per_epoch else '?'
  notes = [] if logs.tag(logs.EVAL, 'top1') in run.scalars else ['no eval yet']
  for tag in (logs.tag(logs.TRAIN, 'loss'), logs.tag(logs.EVAL, 'loss')):
    if tag in run.scalars and not np.isfinite(run.scalars[tag][1]).all():
      steps, values = run.scalars[tag]
      notes.append(f'diverged: {tag} not finite at step {int(steps[~np.isfinite(values)][0])}')
      break
  total = _total_steps(run)
  if 0 < done < total:
    notes.append(f'unfinished: {done:,} of {total:,} steps')
  return f'{done:,} / {epochs}', '; '.join(notes)


def _train_top1(run):
  """The paper's "training accuracy": the top-1 over each whole epoch where
  logged (train_epoch/top1), else over each log interval (older runs)."""
  epoch = logs.tag(logs.TRAIN_EPOCH, 'top1')
  return epoch if epoch in run.scalars else logs.tag(logs.TRAIN, 'top1')


def _difference(a, b):
  return None if a is None or b is None else a - b


def _results_table(runs):
  with_paper = any(isinstance(r.config.get('paper'), dict) for r in runs)
  head = ['run', 'model', 'norm', 'LR schedule', 'clip', 'dropout', 'steps / epochs',
          'train top-1 final / best', 'val top-1 final / best', 'train − val (final)']
  head += ['paper train / val', 'paper train − val', 'Δ val (final − paper)'] if with_paper else []
  rows = [head + ['notes']]
  for run in runs:
    steps_epochs, notes = _progress_cells(run)
    val, train = _last(run, logs.tag(logs.EVAL, 'top1')), _last(run, _train_top1(run))
    row = [run.name, _get(run.config, 'model.name'), _get(run.config, 'model.norm'),
           _lr_cell(run.config), _clip_cell(run.config), _get(run.config, 'model.dropout_rate'),
           steps_epochs,
           f'{_fmt(train, 100)} / {_fmt(_best(run, _train_top1(run)), 100)}',
           f'{_fmt(val, 100)} / {_fmt(_best(run, "eval/top1"), 100)}',
           _fmt(_difference(train, val), 100, sign='+')]
    if with_paper:
      paper = run.config.get('paper') or {}
      train_p, val_p = paper.get('train_top1'), paper.get('val_top1')
      # A twin on another dataset is compared by its ordering, not its numbers.
      on_papers_data = run.config.get('dataset') == 'imagenet2012'
      diff = _difference(100 * val if val is not None else None, val_p) if on_papers_data else None
      row += [f'{_fmt(train_p)} / {_fmt(val_p)}', _fmt(_difference(train_p, val_p), sign='+'),
              _fmt(diff, sign='+')]
    rows.append(row + [notes])
  return _markdown(rows)


def _privacy_table(runs):
  """The DP-SGD runs' privacy and what it bought: epsilon spent at the last
  logged step (at the run's delta), the mechanism's settings, test top-1.
  The stem tells the linear model's features apart."""
  head = ['run', 'model', 'norm', 'stem', 'ε (δ)', 'σ', 'clip C', 'expected batch', 'sampling',
          'augmult', 'feature mean σ', 'steps', 'val top-1 final', 'EMA val top-1 final']
  rows = [head]
  for run in runs:
    if logs.EPSILON not in run.scalars:
      continue
    dp = run.config.get('dp', {})
    steps = run.scalars[logs.EPSILON][0]
    rows.append([
        run.name, _get(run.config, 'model.name'), _get(run.config, 'model.norm'),
        _get(run.config, 'model.stem'),
        f'{_fmt(_last(run, logs.EPSILON))} ({dp.get("delta", "?")})',
        _fmt(_last(run, logs.NOISE_MULTIPLIER), digits=3), dp.get('l2_clip', '?'),
        run.config.get('batch_size', '?'), dp.get('sampling', '?'), dp.get('augmult', '?'),
        _fmt(dp['feature_mean_noise'], digits=1) if dp.get('feature_mean_noise', -1) > 0 else '—',
        int(steps[-1]), _fmt(_last(run, logs.tag(logs.EVAL, 'top1')), 100),
        _fmt(_last(run, logs.tag(logs.EVAL_EMA, 'top1')), 100)])
  return _markdown(rows) if len(rows) > 1 else None


def _privacy_utility_figure(runs):
  """Final test top-1 (filled; EMA: open) against the epsilon spent, one point
  per DP run, with the published points for the runs' datasets; None without
  a DP run."""
  dp_runs = [(i, r) for i, r in enumerate(runs) if logs.EPSILON in r.scalars]
  if not dp_runs:
    return None
  fig = Figure(figsize=(6.4, 4.4), layout='constrained')
  ax = fig.subplots()
  for i, run in dp_runs:
    eps = _last(run, logs.EPSILON)
    for tag, face in ((logs.tag(logs.EVAL, 'top1'), _color(i)),
                      (logs.tag(logs.EVAL_EMA, 'top1'), 'none')):
      if tag in run.scalars:
        ax.plot([eps], [100 * _last(run, tag)], 'o', color=_color(i), markerfacecolor=face,
                label=run.name if face != 'none' else None)
  for who, eps, top1 in {p for _, r in dp_runs
                         for p in PUBLISHED_DP.get(r.config.get('dataset'), ())}:
    ax.plot([eps], [top1], '*', color='black', markersize=10)
    ax.annotate(who, (eps, top1), textcoords='offset points', xytext=(6, -4), fontsize=7)
  ax.set(title='Privacy and utility (open: EMA weights; stars: published)',
         xlabel='ε spent (at each run\'s δ)', ylabel='test top-1 (%)')
  ax.grid(alpha=0.3)
  # Below the axes: runs of one epsilon stack in one column, where any
  # legend inside would cover some of them.
  fig.legend(fontsize=7, loc='outside lower center', ncol=3)
  return fig


def _median_after_first(run, tag):
  """The first logged point includes compilation, so it is left out."""
  values = run.scalars[tag][1][1:] if tag in run.scalars else np.array([])
  return float(np.median(values[np.isfinite(values)])) if np.isfinite(values).any() else None


def _perf_table(runs):
  rows = [['run', 'model', 'norm', 'time / epoch', 'images/s', 'peak memory (GB)']]
  for run in runs:
    seconds = _median_after_first(run, logs.SECONDS_PER_EPOCH)
    time_cell = ('—' if seconds is None else
                 f'{seconds / 60:.1f} min' if seconds > 120 else f'{seconds:.1f} s')
    rows.append([run.name, _get(run.config, 'model.name'), _get(run.config, 'model.norm'),
                 time_cell, _fmt(_median_after_first(run, logs.IMAGES_PER_SEC), digits=0),
                 _fmt(_best(run, logs.PEAK_MEMORY_GB))])
  return _markdown(rows)


# --------------------------------------------------------------- figures ----


def _color(i):
  """tab20's dark shades (tab10's hues) for the first ten runs, then its light
  ones, so that up to twenty runs get distinct colours."""
  return matplotlib.colormaps['tab20']((2 * i + i // 10 % 2) % 20)


def _figure(runs, ncols, nrows=1, height=3.6):
  """A figure with one legend entry per run, whether or not each panel has it;
  as many legend columns as the longest name lets fit in the figure's width,
  and the figure taller by the legend's rows."""
  width = 5.2 * ncols
  name_inches = 0.6 + 0.08 * max(len(r.name) for r in runs)  # Handle + text at 10 pt.
  legend_cols = max(1, min(len(runs), int(width // name_inches)))
  legend_rows = math.ceil(len(runs) / legend_cols)
  fig = Figure(figsize=(width, height * nrows + 0.3 + 0.25 * legend_rows), layout='constrained')
  axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
  handles = [Line2D([], [], color=_color(i), label=r.name) for i, r in enumerate(runs)]
  fig.legend(handles=handles, loc='outside lower center', ncols=legend_cols)
  return fig, axes


def _plot(ax, runs, tag, axis, title, ylabel, scale=1.0, log=False, dashed_tag=None):
  """One line per run that logged `tag`, plus `dashed_tag` dashed in its colour."""
  for i, run in enumerate(runs):
    for t, style in ((tag, '-'), (dashed_tag, '--')):
      if t in run.scalars:
        steps, values = run.scalars[t]
        x = steps / run.steps_per_epoch if axis == 'epoch' else steps
        y = np.where(np.isfinite(values), values * scale, np.nan)  # NaN: a gap in the line.
        ax.plot(x, y, style, color=_color(i), marker='.' if len(x) < 30 else None)
  if not ax.has_data():
    ax.text(0.5, 0.5, f'no {tag} logged', ha='center', va='center', transform=ax.transAxes)
  elif log:
    ax.set_yscale('log', nonpositive='mask')
  ax.set(title=title, xlabel=axis, ylabel=ylabel)
  ax.grid(alpha=0.3)


_OTHER_LOG_SHAPE = {'log': 'log_curve', 'log_curve': 'log'}


def _other_clip_shape(run, axis):
  """(x, threshold) at each epoch start and at the run's planned end, under
  the other of the two log shapes (bnfree_jax/optim.py), or None when it has
  none."""
  clip = run.config.get('grad_clip') or {}
  other, total = _OTHER_LOG_SHAPE.get(clip.get('mode')), _total_steps(run)
  if other is None or not total or not run.steps_per_epoch:
    return None
  steps_per_epoch = max(1, round(run.steps_per_epoch))
  epochs = -(-total // steps_per_epoch)
  schedule = optim.clip_threshold_schedule(
      ml_collections.ConfigDict({**clip, 'mode': other}), steps_per_epoch, epochs)
  steps = np.append(np.arange(epochs) * steps_per_epoch, total)
  x = steps / run.steps_per_epoch if axis == 'epoch' else steps
  # A run of one epoch or less has a constant schedule, which returns a scalar.
  return x, np.broadcast_to(schedule(steps), steps.shape)


def _rebin(hist, edges):
  """Counts of one histogram on common edges, each bucket spread evenly."""
  cdf = np.concatenate([[0.0], np.cumsum(hist[:, 2])])
  return np.diff(np.interp(edges, np.concatenate([hist[:1, 0], hist[:, 1]]), cdf))


def _cell_edges(x):
  """Heatmap column edges, halfway between the logged steps."""
  if len(x) == 1:
    return np.array([x[0] - 0.5, x[0] + 0.5])
  mid = (x[1:] + x[:-1]) / 2
  return np.concatenate([[2 * x[0] - mid[0]], mid, [2 * x[-1] - mid[-1]]])


def _histogram_figure(runs, axis, stage):
  """Paper Fig. 3: log10 |g| of one stage over training, one heatmap per run,
  on a common y range so runs compare."""
  tag = logs.tag(logs.GRAD_HISTOGRAM, stage)
  ncols = min(len(runs), 2)
  fig, axes = _figure(runs, ncols, math.ceil(len(runs) / ncols))
  fig.suptitle(f'log10 |gradient| of {stage} over training (colour: count)')
  hists = [h for r in runs for _, h in r.hists.get(tag, [])]
  lo = min((h[:, 0].min() for h in hists), default=0.0)
  hi = max((h[:, 1].max() for h in hists), default=1.0)
  edges = np.linspace(lo, hi if hi > lo else lo + 1, 61)
  for i, (ax, run) in enumerate(zip(axes, runs)):
    entries = run.hists.get(tag, [])
    ax.set(title=run.name, xlabel=axis, ylabel='log10 |g|')
    ax.title.set_color(_color(i))
    if not entries:
      logged = sorted(t.rsplit('/', 1)[-1] for t in run.hists) or ['none']
      ax.text(0.5, 0.5, f'no {stage} histograms\n(logged: {", ".join(logged)})',
              ha='center', va='center', transform=ax.transAxes)
      ax.set(xticks=[], yticks=[])
      continue
    steps = np.array([s for s, _ in entries], float)
    x = steps / run.steps_per_epoch if axis == 'epoch' else steps
    grid = np.stack([_rebin(h, edges) for _, h in entries], axis=1)
    mesh = ax.pcolormesh(_cell_edges(x), edges, grid, cmap='viridis', shading='flat')
    fig.colorbar(mesh, ax=ax, label='count')
  for ax in axes[len(runs):]:
    ax.set_axis_off()
  return fig


def write_figures(runs, out_dir, hist_stage='stage2', hist_layer=HIST_LAYER):
  """Writes the PNGs named in _FIGURES into out_dir; returns {name: Figure}."""
  # Epochs when every run can convert steps, so all curves share one axis.
  axis = 'epoch' if all(r.steps_per_epoch for r in runs) else 'step'
  figures = {}

  fig, (a, b) = _figure(runs, 2)
  _plot(a, runs, logs.tag(logs.TRAIN, 'loss'), axis, 'Training loss', 'cross-entropy')
  _plot(b, runs, logs.tag(logs.EVAL, 'loss'), axis, 'Validation loss', 'cross-entropy')
  figures['loss'] = fig

  fig, (a, b) = _figure(runs, 2)
  _plot(a, runs, logs.tag(logs.TRAIN, 'top1'), axis, 'Training top-1', 'top-1 (%)', scale=100)
  _plot(b, runs, logs.tag(logs.EVAL, 'top1'), axis, 'Validation top-1', 'top-1 (%)', scale=100)
  figures['accuracy'] = fig

  figures['grad_histograms'] = _histogram_figure(runs, axis, hist_stage)
  figures['grad_histogram_layer'] = _histogram_figure(runs, axis, hist_layer)

  fig, (a, b) = _figure(runs, 2)
  clip_tag = logs.tag(logs.TRAIN, 'clip_threshold')
  _plot(a, runs, logs.tag(logs.TRAIN, 'learning_rate'), axis, 'Learning rate', 'learning rate')
  _plot(b, runs, clip_tag, axis, 'Gradient clipping threshold (dotted: other log shape)',
        'global norm')
  for i, run in enumerate(runs):
    other = _other_clip_shape(run, axis) if clip_tag in run.scalars else None
    if other is not None:
      b.plot(*other, ':', color=_color(i), drawstyle='steps-post')
  figures['schedules'] = fig

  fig, (a,) = _figure(runs, 1, height=4.0)
  _plot(a, runs, logs.tag(logs.TRAIN, 'grad_norm'), axis, 'Gradient global norm (dashed: clip threshold)',
        'global norm', log=True, dashed_tag=logs.tag(logs.TRAIN, 'clip_threshold'))
  figures['grad_norms'] = fig

  privacy_utility = _privacy_utility_figure(runs)
  if privacy_utility:
    figures['privacy_utility'] = privacy_utility

  for name, fig in figures.items():
    fig.savefig(os.path.join(out_dir, f'{name}.png'), dpi=_DPI)
  return figures


# ---------------------------------------------------------------- report ----


def write_report(run_dirs, out_dir, hist_stage='stage2', hist_layer=HIST_LAYER):
  """Writes out_dir/report.md and its figures; returns the report's path."""
  for run_dir in run_dirs:  # All checked before the slow reading starts.
    _check_run_dir(run_dir)
  runs = [load_run(d) for d in run_dirs]
  os.makedirs(out_dir, exist_ok=True)
  write_figures(runs, out_dir, hist_stage, hist_layer)
  lines = [
      '# Training report', '',
      'Runs: ' + ', '.join(f'`{d}`' for d in run_dirs), '',
      '## Top-1 accuracy (%) (paper Tables 1-6)', '',
      _results_table(runs), '',
      'Final: the last logged value (train top-1 is the average over each whole epoch, '
      'train_epoch/top1, where the run logged it; else over each log interval); '
      'best: the highest logged. train − val: the final gap, the overfitting the paper '
      'discusses. Δ val compares the final validation top-1 with the '
      "paper's, for runs on the paper's dataset (ImageNet) only.",
      '']
  privacy = _privacy_table(runs)
  if privacy:
    lines += ['## Differential privacy (DP-SGD)', '', privacy, '',
              'ε: the privacy spent by the last logged step, at δ, by the run\'s accountant '
              '(dp.accountant); with sampling=shuffle it assumes Poisson sampling and is not '
              'a proven guarantee. σ: the noise multiplier; the noise added to the sum of '
              'clipped gradients has std σ C. feature mean σ: the noise multiplier of the '
              'training set\'s feature mean released before training '
              '(dp.feature_mean_noise), whose cost ε includes.', '',
              '![privacy_utility](privacy_utility.png)', '']
  lines += [
      '## Time and memory (paper Table 7)', '',
      _perf_table(runs), '',
      'Medians over the logged points after the first, which includes compilation; '
      'memory is the highest logged peak.', '', '## Figures', '']
  for name, caption in _FIGURES.items():
    lines += [f'### {caption.format(stage=hist_stage, layer=hist_layer)}', '',
              f'![{name}]({name}.png)', '']
  path = os.path.join(out_dir, 'report.md')
  with open(path, 'w') as f:
    f.write('\n'.join(lines))
  return path


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m bnfree_jax.report',
      description='Markdown report and figures from bnfree_jax run directories.')
  parser.add_argument('run_dirs', nargs='+', metavar='RUN_DIR',
                      help='a trainer workdir: event files and config.json')
  parser.add_argument('--out', required=True, metavar='DIR',
                      help='where report.md and the PNGs go (created if missing)')
  parser.add_argument('--hist-stage', default='stage2',
                      help='stage of the per-stage gradient-magnitude heatmaps (stem, '
                           'stage1..4, head)')
  parser.add_argument('--hist-layer', default=HIST_LAYER,
                      help='layer of the one-layer heatmaps, as logged (config.histogram_layer, '
                           "'/' written '.'); the default is ResNet-18's ninth, the paper's Fig. 3")
  args = parser.parse_args(argv)
  try:
    path = write_report(args.run_dirs, args.out, args.hist_stage, args.hist_layer)
  except ReportError as e:
    print(f'{parser.prog}: error: {e}', file=sys.stderr)
    return 2
  print(f'wrote {path}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
