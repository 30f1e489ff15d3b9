"""bnfree_jax.bench on tiny ResNets: records, tables and bad input. Derived
figures are checked against the timings they come from; no assertion is
about speed."""

import json
import statistics

import pytest

from bnfree_jax.bench import __main__ as cli
from bnfree_jax.bench import cpu_flags, train_step

KEYS = ('model', 'variant', 'batch_size', 'image_size', 'step_time_ms', 'step_time_ms_min',
        'step_time_ms_max', 'images_per_sec', 'compile_s', 'flops_per_step', 'temp_bytes',
        'argument_bytes', 'output_bytes', 'peak_bytes', 'device', 'jax_version', 'xla_flags',
        'load_avg_start', 'ratio_to_batch', 'compute_dtype')


def _images_per_sec_agree(r):
  assert r['images_per_sec'] == pytest.approx(r['batch_size'] / (r['step_time_ms'] / 1e3))
  assert r['step_time_ms'] == pytest.approx(statistics.median(r['step_times_ms']))


def test_tiny_train_step_bench(tmp_path, capsys):
  out, md = tmp_path / 'bench.json', tmp_path / 'bench.md'
  code = cli.main(['--models', 'resnet18', '--variants', 'batch,weight', '--width', '8',
                   '--image-size', '32', '--batch-size', '4', '--steps', '3',
                   '--warmup', '1', '--json', str(out), '--md', str(md)])
  assert code == 0
  records = json.loads(out.read_text())
  assert [r['variant'] for r in records] == ['batch', 'weight']
  for r in records:
    assert set(KEYS) <= set(r), set(KEYS) - set(r)
    assert (r['model'], r['batch_size'], r['image_size'], r['width']) == ('resnet18', 4, 32, 8)
    for key in ('step_time_ms', 'images_per_sec', 'compile_s', 'flops_per_step',
                'temp_bytes', 'argument_bytes'):
      assert r[key] > 0, key
    assert r['step_time_ms_min'] <= r['step_time_ms'] <= r['step_time_ms_max']
    assert len(r['step_times_ms']) == 3 and r['all_finite']
    _images_per_sec_agree(r)
  # The ratio is the median of per-round ratios, each round's two steps side by side.
  batch, weight = (r['step_times_ms'] for r in records)
  assert records[1]['ratio_to_batch'] == pytest.approx(
      statistics.median(w / b for w, b in zip(weight, batch)))
  assert records[0]['ratio_to_batch'] == 1.0

  table = capsys.readouterr().out
  assert md.read_text().strip() == table.strip()
  rows = [line for line in table.splitlines() if line.startswith('| resnet18 |')]
  assert [row.split(' | ')[1] for row in rows] == ['batch', 'weight']
  assert rows[1].split(' | ')[4].startswith(f"{records[1]['ratio_to_batch']:.2f} (")


def test_variant_expansion():
  assert train_step.parse_variants(['weight', 'batch'], memory_options=True) == [
      'weight', 'weight+remat', 'weight+bf16', 'batch', 'batch+remat', 'batch+bf16']
  assert train_step.parse_variants(['weight+bf16'], remat=True) == ['weight+bf16+remat']
  assert train_step.parse_variants(['none'], compute_dtype='bfloat16') == ['none+bf16']
  c = train_step.variant_config('resnet18', 'weight_clip_dropout+remat+bf16', 16, 224, 64)
  assert (c.model.norm, c.model.dropout_rate, c.grad_clip.mode, c.remat, c.compute_dtype) == (
      'weight', 0.1, 'log', True, 'bfloat16')
  assert train_step.variant_config('resnet18', 'batch', 16, 224, 64).grad_clip.mode == 'none'


@pytest.mark.parametrize('argv, allowed', [
    (['--variants', 'batch,wieght'], 'weight_clip_dropout'),
    (['--variants', 'weight+fp16'], '+remat'),
    (['--models', 'resnet19'], 'resnet50'),
    (['--input', 'cifar10'], 'fashion_mnist'),
    (['--steps', '0'], '>= 1'),
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
