"""bench.py on a tiny ResNet-18: records, table and bad input. No timing assertions."""

import json

import pytest

from bnfree_jax import bench

KEYS = ('model', 'variant', 'batch_size', 'image_size', 'step_time_ms', 'step_time_ms_min',
        'step_time_ms_max', 'images_per_sec', 'compile_s', 'flops_per_step', 'temp_bytes',
        'argument_bytes', 'output_bytes', 'peak_bytes', 'device', 'jax_version', 'xla_flags',
        'load_avg_start', 'ratio_to_batch')


def test_tiny_train_step_bench(tmp_path, capsys):
  out = tmp_path / 'bench.json'
  md = tmp_path / 'bench.md'
  code = bench.main(['--models', 'resnet18', '--variants', 'batch,weight', '--width', '8',
                     '--image-size', '32', '--batch-size', '4', '--steps', '2',
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
    assert len(r['step_times_ms']) == 2 and r['all_finite']
  assert records[0]['ratio_to_batch'] == 1.0

  table = capsys.readouterr().out
  assert md.read_text().strip() == table.strip()
  rows = [line for line in table.splitlines() if line.startswith('| resnet18 |')]
  assert len(rows) == 2
  assert rows[0].split(' | ')[1] == 'batch' and rows[0].split(' | ')[4] == '1.00 (1.00–1.00)'
  assert rows[1].split(' | ')[1] == 'weight'


def test_variant_expansion():
  assert bench.parse_variants(['weight', 'batch'], memory_options=True) == [
      'weight', 'weight+remat', 'weight+bf16', 'batch', 'batch+remat', 'batch+bf16']
  assert bench.parse_variants(['weight+bf16'], remat=True) == ['weight+bf16+remat']
  assert bench.parse_variants(['none'], compute_dtype='bfloat16') == ['none+bf16']
  c = bench.variant_config('resnet18', 'weight_clip_dropout+remat+bf16', 16, 224, 64)
  assert (c.model.norm, c.model.dropout_rate, c.grad_clip.mode, c.remat, c.compute_dtype) == (
      'weight', 0.1, 'log', True, 'bfloat16')
  assert bench.variant_config('resnet18', 'batch', 16, 224, 64).grad_clip.mode == 'none'


@pytest.mark.parametrize('argv, allowed', [
    (['--variants', 'batch,wieght'], 'weight_clip_dropout'),
    (['--variants', 'weight+fp16'], '+remat'),
    (['--models', 'resnet19'], 'resnet50'),
    (['--input', 'cifar10'], 'fashion_mnist'),
    (['--steps', '0'], '>= 1'),
])
def test_bad_input_exits_2_with_one_line(argv, allowed, capsys):
  assert bench.main(argv) == 2
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
  table = bench.sweep_table([
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


def test_input_pipeline_rate_and_headroom():
  """ImageNet-style decode + augment on JPEGs made in the test (tfds mock_data)."""
  row = bench.measure_input('imagenet', 8, 1.0, num_jpegs=16)
  assert row['input'] == 'imagenet' and row['batch_size'] == 8
  assert '16 generated 500x375 JPEGs' in row['source']
  assert row['images_per_sec'] > 8  # More than one batch in the timed second.
  row.update(consumption='a step', consumption_images_per_sec=row['images_per_sec'] / 4,
             load_avg=1.0, other_cpu_cores=0.0)
  assert '| 4.0x |' in bench.input_table([row])
