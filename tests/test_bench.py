"""bnfree_jax.bench on tiny ResNets: records, tables, the suite's dry run and
bad input. Derived figures are checked against the timings they come from;
no assertion is about speed."""

import ast
import json
import os
import statistics
import subprocess
import sys

import pytest

from bnfree_jax import models
from bnfree_jax.bench import __main__ as cli
from bnfree_jax.bench import common, cpu_flags, suite, train_step

KEYS = ('model', 'variant', 'batch_size', 'image_size', 'step_time_ms', 'step_time_ms_min',
        'step_time_ms_max', 'images_per_sec', 'compile_s', 'flops_per_step', 'temp_bytes',
        'argument_bytes', 'output_bytes', 'peak_bytes', 'device', 'jax_version', 'xla_flags',
        'load_avg_start', 'ratio_to_batch', 'compute_dtype', 'framework', 'mfu', 'step_cpu_ms')


def _images_per_sec_agree(r):
  assert r['images_per_sec'] == pytest.approx(r['batch_size'] / (r['step_time_ms'] / 1e3))
  assert r['step_time_ms'] == pytest.approx(statistics.median(r['step_times_ms']))


def test_tiny_train_step_bench(tmp_path, capsys):
  out, md, trace = tmp_path / 'bench.json', tmp_path / 'bench.md', tmp_path / 'trace'
  code = cli.main(['--models', 'resnet10', '--variants', 'batch,weight', '--width', '8',
                   '--image-size', '32', '--batch-size', '4', '--steps', '3',
                   '--warmup', '1', '--json', str(out), '--md', str(md), '--trace', str(trace)])
  assert code == 0
  records = json.loads(out.read_text())
  assert [r['variant'] for r in records] == ['batch', 'weight']
  for r in records:
    assert set(KEYS) <= set(r), set(KEYS) - set(r)
    assert (r['model'], r['batch_size'], r['image_size'], r['width']) == ('resnet10', 4, 32, 8)
    for key in ('step_time_ms', 'images_per_sec', 'compile_s', 'flops_per_step',
                'temp_bytes', 'argument_bytes'):
      assert r[key] > 0, key
    assert r['step_time_ms_min'] <= r['step_time_ms'] <= r['step_time_ms_max']
    assert len(r['step_times_ms']) == len(r['step_cpu_times_ms']) == 3 and r['all_finite']
    assert r['step_cpu_ms'] == pytest.approx(statistics.median(r['step_cpu_times_ms']))
    assert r['step_cpu_ms'] > 0
    _images_per_sec_agree(r)
    assert r['mfu'] is None  # No known peak for a CPU.
  # The ratio is the median of per-round ratios, each round's two steps side by side.
  batch, weight = (r['step_times_ms'] for r in records)
  assert records[1]['ratio_to_batch'] == pytest.approx(
      statistics.median(w / b for w, b in zip(weight, batch)))
  assert records[0]['ratio_to_batch'] == 1.0
  assert list(trace.rglob('*.xplane.pb'))  # The timed rounds' profile.

  table = capsys.readouterr().out
  assert md.read_text().strip() == table.strip()
  rows = [line for line in table.splitlines() if line.startswith('| resnet10 |')]
  assert [row.split(' | ')[1] for row in rows] == ['batch', 'weight']
  assert rows[1].split(' | ')[5].startswith(f"{records[1]['ratio_to_batch']:.2f} (")
  assert rows[1].split(' | ')[3] == f"{records[1]['step_cpu_ms']:.0f}"


def test_dp_row_is_held_against_its_nonprivate_twin(tmp_path, capsys):
  """'dp' (issue 20): the trainer's DP-SGD step on one micro-batch of the
  whole batch, timed beside 'group', the same network without privacy."""
  out = tmp_path / 'bench.json'
  assert cli.main(['--models', 'resnet10', '--variants', 'group,dp', '--width', '8',
                   '--image-size', '16', '--batch-size', '4', '--steps', '3', '--warmup', '1',
                   '--num-classes', '10', '--channels', '1', '--json', str(out)]) == 0
  group, dp = json.loads(out.read_text())
  assert (group['norm'], dp['norm'], dp['variant']) == ('group', 'group', 'dp')
  assert {(r['num_classes'], r['channels']) for r in (group, dp)} == {(10, 1)}  # Fashion-MNIST's.
  assert dp['all_finite'] and dp['compile_s'] is None and dp['flops_per_step'] is None
  _images_per_sec_agree(dp)
  assert dp['ratio_to_nonprivate'] == pytest.approx(statistics.median(
      d / g for d, g in zip(dp['step_times_ms'], group['step_times_ms'])))
  assert 'ratio_to_nonprivate' not in group
  row, = [line for line in capsys.readouterr().out.splitlines() if line.startswith('| resnet10 | dp')]
  assert f"× group: {dp['ratio_to_nonprivate']:.2f} (" in row and ' | — | — |' in row
  c = train_step.variant_config('resnet18', 'dp', 16, 28, 8)
  assert (c.dp.enabled, c.dp.microbatch_size, c.dp.noise_multiplier, c.dp.l2_clip) == (
      True, 16, 1.0, 1.0)


def test_variant_expansion():
  assert train_step.parse_variants(['weight', 'batch'], memory_options=True) == [
      'weight', 'weight+remat', 'weight+bf16', 'batch', 'batch+remat', 'batch+bf16']
  assert train_step.parse_variants(['weight+bf16'], remat=True) == ['weight+bf16+remat']
  assert train_step.parse_variants(['none'], compute_dtype='bfloat16') == ['none+bf16']
  c = train_step.variant_config('resnet18', 'weight_clip_dropout+remat+bf16', 16, 224, 64)
  assert (c.model.norm, c.model.dropout_rate, c.grad_clip.mode, c.remat, c.compute_dtype) == (
      'weight', 0.1, 'log', True, 'bfloat16')
  assert train_step.variant_config('resnet18', 'batch', 16, 224, 64).grad_clip.mode == 'none'
  c = train_step.variant_config('nf_resnet50', 'nf_agc+bf16', 16, 224, 64)
  assert (c.model.name, c.model.norm, c.grad_clip.mode, c.grad_clip.agc_clipping) == (
      'nf_resnet50', 'scaled_ws', 'agc', 0.01)
  # Each family its own variants; the default variants (all) fit both.
  assert train_step.rows(['resnet50', 'nf_resnet50'], list(train_step.VARIANTS)) == [
      *(('resnet50', v) for v in train_step.VARIANTS if v != 'nf_agc'),
      ('nf_resnet50', 'nf_agc')]


def test_suite_plan_gives_nf_resnet50_its_own_variant_and_peer():
  """The default suite: nf_resnet50's worker measures nf_agc only, and
  resnet50's everything else; the peer runs timm's model (or records why not)."""
  def jobs(timm):
    args = cli._parser().parse_args(['--suite', 'gpu', '--peer-python', sys.executable])
    cli._validate(args)
    args.peer_skip, args.peer_timm = None, timm
    return {job.name: job for job in suite.plan(args)}

  plan = jobs(timm=True)
  arg = lambda job, flag: job.cmd[job.cmd.index(flag) + 1]
  assert arg(plan['bnfree_jax nf_resnet50_b256_bfloat16'], '--variants') == 'nf_agc+bf16'
  assert arg(plan['bnfree_jax resnet50_b128_float32'], '--variants') == (
      'batch,weight,weight_clip_dropout,none')
  peer = plan['torch eager nf_resnet50_b256_bfloat16']
  assert arg(peer, '--norms') == 'nf_agc' and peer.skip is None
  assert [r['variant'] for r in peer.rows] == ['nf_agc+bf16']
  assert arg(plan['torch compile resnet18_b256_float32'], '--norms') == 'batch,weight'
  assert 'no timm' in jobs(timm=False)['torch compile nf_resnet50_b256_float32'].skip
  assert jobs(timm=False)['torch compile resnet50_b256_float32'].skip is None


@pytest.mark.parametrize('argv, allowed', [
    (['--variants', 'batch,wieght'], 'weight_clip_dropout'),
    (['--variants', 'weight+fp16'], '+remat'),
    (['--models', 'resnet19'], 'resnet50'),
    (['--models', 'nf_resnet50', '--variants', 'batch,weight'], 'nf_agc only'),
    (['--suite', 'gpu', '--models', 'nf_resnet50', '--variants', 'batch'], 'nf_agc only'),
    (['--input', 'cifar10'], 'fashion_mnist'),
    (['--steps', '0'], '>= 1'),
    (['--num-classes', '1'], '>= 2'),
    (['--suite', 'gpu', '--channels', '1'], 'train step only'),
    (['--suite', 'tpu'], 'gpu'),
    (['--suite', 'gpu', '--variants', 'weight+bf16'], 'weight_clip_dropout'),
    (['--suite', 'gpu', '--compute-dtype', 'float16'], 'bfloat16'),
    (['--suite', 'gpu', '--peer', 'tf'], 'torch, none'),
    (['--suite', 'gpu', '--peer-modes', 'eager,jit'], 'eager, compile'),
    (['--suite', 'gpu', '--peer-python', '/no/such/python'], '--peer none'),
    (['--suite', 'gpu', '--width', '8'], 'timm\'s, at their own width'),
    (['--suite', 'gpu', '--models', 'nf_resnet50', '--variants', 'nf_agc', '--stem', 'small'],
     '--peer none'),
    (['--suite', 'gpu', '--models', 'resnet18', '--stem', 'scatter'], 'no scattering'),
    (['--stem', 'cifar'], 'imagenet, small'),
    (['--suite', 'gpu', '--input', 'imagenet'], 'give one of them'),
    (['--dry-run'], '--suite'),
    (['--input', 'imagenet', '--trace', 'x'], '--suite'),
    (['--baseline', '.'], '--sweep-cpu-flags only'),
    (['--sweep-cpu-flags', '--baseline', '/no/such/dir'], 'not a bnfree_jax checkout'),
])
def test_bad_input_exits_2_with_one_line(argv, allowed, capsys):
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith('error:') and allowed in err


def test_sweep_verdicts():
  def row(label, ratios, error=None):
    records = [] if error else [
        dict(model='resnet18', variant=v, step_time_ms=1000 * r[0], step_times_ms=[1000.0] * 4,
             compile_s=1.0, load_avg_start=1.0, load_avg_end=1.0) for v, r in ratios.items()]
    return dict(label=label, setting='(none)', error=error, group=0, records=records,
                other_cpu_cores=0.0,
                ratios={f'resnet18 {v}': r for v, r in ratios.items()})
  same = [1.0, 1.0, 1.0, 1.0]
  table = cpu_flags.sweep_table([
      row('default', {'batch': same, 'weight': same}),
      row('fast', {'batch': [0.90, 0.92, 0.88, 0.95], 'weight': [0.9, 0.9, 0.9, 0.9]}),
      row('noisy', {'batch': [0.80, 1.20, 0.85, 1.10], 'weight': [0.9, 1.1, 0.9, 1.1]}),
      row('slow', {'batch': [1.2, 1.2, 1.3, 1.2], 'weight': [1.1, 1.1, 1.1, 1.1]}),
      row('bad flag', {}, error='rc=1: Unknown flag'),
  ])
  verdicts = {line.split(' | ')[0].strip('| '): line.rsplit(' | ', 1)[1].strip(' |')
              for line in table.splitlines() if line.startswith('| ') and '---' not in line}
  assert verdicts['default'] == 'baseline of group 1'
  assert verdicts['fast'] == 'helps'
  assert verdicts['noisy'] == 'no clear effect'
  assert verdicts['slow'] == 'hurts'
  assert verdicts['bad flag'].startswith('failed: rc=1')


def test_baseline_sweep_runs_the_other_checkouts_code(tmp_path):
  """The default setting's worker imports bnfree_jax from the baseline
  checkout, the others from this one."""
  (tmp_path / 'bnfree_jax' / 'bench').mkdir(parents=True)
  (tmp_path / 'bnfree_jax' / '__init__.py').write_text('')
  (tmp_path / 'bnfree_jax' / 'bench' / '__main__.py').write_text('')
  settings = cpu_flags.against_baseline(str(tmp_path), [('fast', {'XLA_FLAGS': '--x'}, [])])
  assert [label for label, _, _ in settings] == ['default', 'this checkout', 'fast']
  where = 'import bnfree_jax; print(bnfree_jax.__file__)'
  imported = [subprocess.run([*prefix, sys.executable, '-c', where], cwd=common.REPO, text=True,
                             capture_output=True, check=True).stdout for _, _, prefix in settings]
  assert imported[0].startswith(str(tmp_path))
  assert not any(path.startswith(str(tmp_path)) for path in imported[1:])


def test_input_pipeline_headroom_from_fixed_numbers():
  input_bench = pytest.importorskip('bnfree_jax.bench.input')  # Needs TensorFlow.
  row = dict(input='imagenet', source='s', batch_size=8, images_per_sec=700.0,
             consumption='a step', consumption_images_per_sec=10.0, load_avg=1.0,
             other_cpu_cores=0.0)
  assert input_bench.headroom(row) == 70.0
  row['headroom'] = input_bench.headroom(row)
  assert '| 700 | 10.0 (a step) | 70.0x |' in input_bench.input_table([row])


def test_input_pipeline_rate():
  """ImageNet-style decode + augment on JPEGs made in the test (tfds mock_data)."""
  input_bench = pytest.importorskip('bnfree_jax.bench.input')
  row = input_bench.measure_input('imagenet', 8, 1.0, num_jpegs=16)
  assert row['input'] == 'imagenet' and row['batch_size'] == 8
  assert '16 generated 500x375 JPEGs' in row['source']
  assert row['images_per_sec'] > 8  # More than one batch in the timed second.
  assert row['images_per_sec'] == pytest.approx(row['batches'] * 8 / row['seconds'])


def test_mfu_from_fixed_numbers():
  assert train_step.peak('NVIDIA H100 80GB HBM3', 'bfloat16') == ('H100 SXM bf16 dense', 989.4)
  assert train_step.peak('NVIDIA H100 PCIe', 'float32') == ('H100 PCIe tf32 dense', 378.0)
  assert train_step.peak('NVIDIA H200', 'bfloat16') == ('H200 SXM bf16 dense', 989.4)
  assert train_step.peak('NVIDIA A100-SXM4-80GB', 'float32') == ('A100 tf32 dense', 156.0)
  assert train_step.peak('Tesla V100-SXM2-16GB', 'bfloat16') == ('V100 SXM2 fp32 dense', 15.7)
  assert train_step.peak('cpu', 'float32') == (None, None)
  # 2.5 TFLOP in 10 ms on two devices of 250 TFLOP/s: half the peak.
  assert train_step.mfu(2.5e12, 0.010, 250.0, 2) == pytest.approx(0.5)
  assert train_step.mfu(None, 0.010, 250.0, 1) is None
  assert train_step.mfu(2.5e12, 0.010, None, 1) is None


def _row(framework, variant, ms, mode=None, **extra):
  return dict(part='train_step', framework=framework, mode=mode, model='resnet50',
              variant=variant, compute_dtype='bfloat16', batch_size=256, image_size=224,
              step_time_ms=ms, step_time_ms_min=ms, step_time_ms_max=ms, step_times_ms=[ms],
              images_per_sec=256 / (ms / 1e3), all_finite=True, device='gpu:X x1', **extra)


def test_suite_ratios_and_markdown_from_fixed_records():
  meta = dict(part='suite', suite='gpu', dry_run=False, command='python -m bnfree_jax.bench',
              budget_s=480.0, image_size=224, steps=20, warmup=3, jax_version='0.10.2',
              finished=True, elapsed_s=400.0)
  jax_extra = dict(flops_per_step=6e12, flops_per_sec=6e12 / 0.040, mfu=0.1, peak_bytes=2**30,
                   xla_bytes=2**30, compile_s=30.0, peak_name='H100 SXM bf16 dense',
                   peak_tflops=989.4)
  records = suite.finalize([
      meta,
      _row('bnfree_jax', 'batch+bf16', 40.0, **jax_extra),
      _row('bnfree_jax', 'weight+bf16', 30.0, **jax_extra),
      {**_row('bnfree_jax', 'nf_agc+bf16', 60.0, **jax_extra), 'model': 'nf_resnet50'},
      _row('torch', 'batch+bf16', 50.0, mode='eager', torch_version='2', torchvision_version='0'),
      _row('torch', 'weight+bf16', 80.0, mode='eager', torch_version='2', torchvision_version='0'),
      dict(part='train_step', framework='torch', mode='compile', model='resnet50',
           variant='weight+bf16', compute_dtype='bfloat16', batch_size=256,
           skipped='time budget spent'),
      dict(part='e2e', framework='bnfree_jax', model='resnet50', variant='weight+bf16',
           compute_dtype='bfloat16', batch_size=256, image_size=224, steps=200,
           recipe='configs/resnet50_wn.py', images_per_sec=6400.0, wall_s=90.0),
  ])
  by = {(r['framework'], r['mode'], r['variant']): r for r in records
        if r['part'] == 'train_step'}
  assert by['bnfree_jax', None, 'weight+bf16']['ratio_to_batch'] == pytest.approx(30 / 40)
  assert by['torch', 'eager', 'weight+bf16']['ratio_to_batch'] == pytest.approx(80 / 50)
  # nf_resnet50 against resnet50 with BN.
  assert by['bnfree_jax', None, 'nf_agc+bf16']['ratio_to_batch'] == pytest.approx(60 / 40)
  assert by['torch', 'eager', 'batch+bf16']['ratio_to_batch'] == 1.0
  # Every train-step record has the same keys, the peer's and the project's.
  rows = [r for r in records if r['part'] == 'train_step']
  assert len({frozenset(r) for r in rows}) == 1
  e2e = records[-1]
  jax_weight = by['bnfree_jax', None, 'weight+bf16']
  assert e2e['bench_images_per_sec'] == jax_weight['images_per_sec']
  assert e2e['loop_vs_step'] == pytest.approx(6400 / jax_weight['images_per_sec'])

  text = suite.markdown(records)
  lines = text.splitlines()
  row = next(line for line in lines if line.startswith('| bnfree_jax | resnet50 | 256 | '
                                                       'bfloat16 | weight+bf16 |'))
  # × batch, GFLOP/step, TFLOP/s, MFU.
  assert ' | 0.75 | 6000 | 150 | 10.0% | ' in row
  vs = next(line for line in lines if line.startswith('| resnet50 | 256 | bfloat16 | weight+bf16'))
  # bnfree_jax 8533 img/s against torch eager's 3200: 2.67x; no compile row.
  assert vs.split(' | ')[5:8] == ['3200.0', f'{(256 / 0.030) / 3200:.2f}', '—']
  assert '- time budget spent: torch compile resnet50 weight+bf16 batch 256' in lines


def _no_tensorflow(tmp_path):
  """A PYTHONPATH entry under which `import tensorflow` fails, in this
  process's children and theirs."""
  blocker = tmp_path / 'no_tf' / 'tensorflow'
  blocker.mkdir(parents=True)
  (blocker / '__init__.py').write_text("raise ImportError('tensorflow is blocked by the test')\n")
  return str(blocker.parent)


def test_suite_dry_run_without_tensorflow(tmp_path):
  """The whole suite's machinery at toy sizes on CPU, where TensorFlow cannot
  be imported: a worker per job, the peer (run, or recorded as skipped where
  this Python has no torch), the trainer end to end, a trace."""
  out, md, trace = tmp_path / 'suite.json', tmp_path / 'suite.md', tmp_path / 'trace'
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join(
      [_no_tensorflow(tmp_path), *filter(None, [os.environ.get('PYTHONPATH')])])}
  env.pop('JAX_NUM_CPU_DEVICES')  # conftest's 4 devices would not split the toy batch of 2.
  # Width 8, two variants, one dtype and eager mode keep it short; the code
  # paths are all there. Run from tmp_path: the jobs, which run in the
  # repository, still write the relative trace folder here.
  proc = subprocess.run(
      [sys.executable, '-m', 'bnfree_jax.bench', '--suite', 'gpu', '--dry-run', '--models',
       'resnet18', '--width', '8', '--variants', 'batch,weight_clip_dropout',
       '--compute-dtype', 'bfloat16', '--peer-modes', 'eager', '--json', str(out),
       '--md', str(md), '--trace', 'trace'],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = json.loads(out.read_text())
  meta, rows = records[0], [r for r in records if r['part'] == 'train_step']
  assert meta['finished'] and meta['dry_run']
  assert md.read_text() == suite.markdown(records)
  # A line per row as it finished, before the report.
  live = proc.stdout.split('Suite gpu (dry run)')[0].splitlines()
  assert live[0] == suite.LIVE_HEADER.splitlines()[0] and len(live) == 2 + len(records) - 1

  jax_rows = {r['variant']: r for r in rows if r['framework'] == 'bnfree_jax'}
  assert set(jax_rows) == {'batch+bf16', 'weight_clip_dropout+bf16'}
  for r in jax_rows.values():
    assert not r['skipped'] and r['all_finite'] and r['compute_dtype'] == 'bfloat16'
    assert r['width'] == 8
    _images_per_sec_agree(r)
    assert r['ratio_to_batch'] == pytest.approx(
        r['step_time_ms'] / jax_rows['batch+bf16']['step_time_ms'])
    assert list((trace / 'resnet18_b2_bfloat16').rglob('*.xplane.pb'))
  peer = [r for r in rows if r['framework'] == 'torch']
  assert {(r['mode'], r['variant']) for r in peer} == {('eager', 'batch+bf16'),
                                                        ('eager', 'weight+bf16')}
  if meta['peer']:
    assert not any(r['skipped'] for r in peer)
    for r in peer:
      assert r['width'] == 8
      _images_per_sec_agree(r)
      assert r['torch_version'] == meta['peer']['torch_version']
  else:
    assert all('torch' in r['skipped'] for r in peer), peer
  e2e, = (r for r in records if r['part'] == 'e2e')
  assert e2e['images_per_sec'] > 0 and e2e['steps'] == 4
  assert e2e['loop_vs_step'] == pytest.approx(
      e2e['images_per_sec'] / jax_rows['weight_clip_dropout+bf16']['images_per_sec'])


def test_torch_peer_mirrors_bnfree_jax_constants():
  """torch_peer.py runs without jax, so it keeps its own copies of the
  geometry and learning rates it must share with bnfree_jax: read them from
  its source (CI has no torch) and hold them to the originals."""
  source = ast.parse(open(os.path.join(os.path.dirname(train_step.__file__), 'torch_peer.py')).read())
  peer = {node.targets[0].id: ast.literal_eval(node.value) for node in source.body
          if isinstance(node, ast.Assign) and len(node.targets) == 1
          and isinstance(node.targets[0], ast.Name) and node.targets[0].id.isupper()
          and isinstance(node.value, (ast.Constant, ast.Dict, ast.Tuple))}
  assert peer['SMALL_STEMS'] == {name: stem.strides for name, stem in models.STEMS.items()
                                 if (stem.kernel, stem.pool, stem.scatter) == (3, False, False)}
  assert peer['GN_GROUPS'] == models.ResNet.gn_groups  # The field's default.
  assert set(peer['MODELS']) <= set(models.MODELS)
  assert peer['COMPUTE_DTYPES'] == train_step.COMPUTE_DTYPES
  assert peer['BASE_LR'] == {v: train_step.VARIANTS[v]['base_lr'] for v in peer['BASE_LR']}
  assert peer['AGC_CLIPPING'] == train_step.VARIANTS['nf_agc']['agc']
