"""DP-SGD step time per example, bnfree_jax against Opacus on the same CPU
core, and each against its own non-private step (issue 20, item 7):

  python scripts/dp_vs_opacus.py --peer-python /work/torchenv/bin/python \
      --core 1 --rounds 2 --out results/bench/dp_vs_opacus

Each round runs `python -m bnfree_jax.bench --variants group,dp` and then
torch_peer.py `--norms group,dp` (Opacus), each on one thread pinned to
--core, alternating so that a change of load hits both. The network is
torchvision's ResNet with GroupNorm where BN was, in both frameworks: the
Fashion-MNIST recipe's (configs/dp_fashion_mnist.py: its model, width and
stem, one micro-batch, on Fashion-MNIST's 28 px, 1 channel and 10 classes)
and a ResNet-18 at ImageNet's size (width 64, 224 px, 3 channels, 1000
classes, batch 16). Writes OUT.json (every record, `round` added) and OUT.md
(the table).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from bnfree_jax import datasets
from configs import dp_fashion_mnist  # The installed package, as the trainer loads it.

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_RECIPE = dp_fashion_mnist.get_config()


def _data(dataset):
  """(image size, classes, channels) of a dataset's images."""
  classes, size, mean, _ = datasets.SPECS[dataset]
  return size, classes, len(mean)


SHAPES = {  # name -> (model, width, stem, batch size, image size, classes, channels)
    'recipe': (_RECIPE.model.name, _RECIPE.model.width, _RECIPE.model.stem,
               _RECIPE.dp.microbatch_size, *_data(_RECIPE.dataset)),
    'imagenet': ('resnet18', 64, 'imagenet', 16, *_data('imagenet2012')),
}


def _run(cmd, env):
  """cmd's stdout; the command goes to stderr first."""
  print('+', ' '.join(cmd), file=sys.stderr, flush=True)
  return subprocess.run(cmd, cwd=REPO, env={**os.environ, **env}, check=True,
                        stdout=subprocess.PIPE, text=True).stdout


def measure(args):
  records = []
  common = ['--steps', str(args.steps), '--warmup', str(args.warmup)]
  with tempfile.TemporaryDirectory() as tmp:
    for r in range(args.rounds):
      for shape in args.shapes:
        model, width, stem, batch, size, classes, channels = SHAPES[shape]
        geometry = ['--models', model, '--width', str(width), '--stem', stem,
                    '--image-size', str(size), '--batch-size', str(batch),
                    '--num-classes', str(classes), '--channels', str(channels)]
        out = os.path.join(tmp, f'jax_{shape}_{r}.json')
        _run(['taskset', '-c', str(args.core), sys.executable, '-m', 'bnfree_jax.bench',
              '--variants', 'group,dp', *geometry, *common, '--json', out],
             {'JAX_NUM_CPU_DEVICES': '1',
              'XLA_FLAGS': '--xla_cpu_multi_thread_eigen=false'})
        jax_records = json.load(open(out))
        peer = _run(['taskset', '-c', str(args.core), args.peer_python,
                     os.path.join(REPO, 'bnfree_jax', 'bench', 'torch_peer.py'),
                     '--norms', 'group,dp', '--modes', 'eager', '--compute-dtype', 'float32',
                     '--device', 'cpu', *geometry, *common], {'OMP_NUM_THREADS': '1'})
        torch_records = [json.loads(line) for line in peer.splitlines() if line.startswith('{')]
        for record in jax_records + torch_records:
          records.append(dict(record, round=r, shape=shape))
  return records


def table(records):
  """One row per shape: medians over rounds of each run's median step, per example."""
  def ms_per_example(framework, shape, variant, key):
    values = [r[key] / r['batch_size'] for r in records
              if (r['framework'], r['shape'], r['variant']) == (framework, shape, variant)]
    return statistics.median(values)

  jax_record = next(r for r in records if r['framework'] == 'bnfree_jax')
  torch_record = next(r for r in records if (r['framework'], r['variant']) == ('torch', 'dp'))
  lines = [
      f"DP-SGD step per example, one core each, float32, eager PyTorch. "
      f"{torch_record['device']}; jax {jax_record['jax_version']}, "
      f"torch {torch_record['torch_version']}, opacus {torch_record.get('opacus_version')}. "
      "Medians over rounds of each run's median step; CPU: the step's CPU time, the steadier "
      "figure on a shared machine. dp/group: the DP-SGD step over the same network's "
      "non-private step (bnfree_jax: median of per-round ratios, interleaved in one process).",
      '',
      '| network | bnfree_jax group ms/ex (CPU) | bnfree_jax dp ms/ex (CPU) | bnfree_jax dp ÷ group '
      '| Opacus group ms/ex (CPU) | Opacus dp ms/ex (CPU) | Opacus dp ÷ group '
      '| bnfree_jax dp ÷ Opacus dp, CPU (wall) | the same, per round: median (range) |',
      '|---|---|---|---|---|---|---|---|---|']
  for shape in dict.fromkeys(r['shape'] for r in records):
    # From the records (the peer's name the stem too): --table-only may
    # rewrite a table measured before SHAPES changed.
    first = next(r for r in records if r['shape'] == shape and r['framework'] == 'torch')
    model, width, stem, size, batch = (first[k] for k in ('model', 'width', 'stem', 'image_size',
                                                          'batch_size'))
    # Records from before --num-classes and --channels: ImageNet's.
    _, imagenet_classes, imagenet_channels = _data('imagenet2012')
    classes = first.get('num_classes', imagenet_classes)
    channels = first.get('channels', imagenet_channels)
    cell = {}
    for framework in ('bnfree_jax', 'torch'):
      for variant in ('group', 'dp'):
        cell[framework, variant] = (ms_per_example(framework, shape, variant, 'step_time_ms'),
                                    ms_per_example(framework, shape, variant, 'step_cpu_ms'))
    jax_ratio = statistics.median(r['ratio_to_nonprivate'] for r in records if (
        r['framework'], r['shape'], r['variant']) == ('bnfree_jax', shape, 'dp'))
    torch_ratio = cell['torch', 'dp'][1] / cell['torch', 'group'][1]
    # Each round's two DP steps, side by side in time: a slow phase of the
    # machine hits both.
    dp_cpu = {(r['framework'], r['round']): r['step_cpu_ms'] for r in records
              if (r['shape'], r['variant']) == (shape, 'dp')}
    per_round = [dp_cpu['bnfree_jax', n] / dp_cpu['torch', n]
                 for f, n in dp_cpu if f == 'bnfree_jax' and ('torch', n) in dp_cpu]
    fmt = lambda c: f'{c[0]:.2f} ({c[1]:.2f})'
    lines.append(
        f"| {model.replace('resnet', 'ResNet-')} GroupNorm, width {width}, {stem} stem, "
        f"{size} px x {channels}, {classes} classes, batch {batch} | "
        f"{fmt(cell['bnfree_jax', 'group'])} | {fmt(cell['bnfree_jax', 'dp'])} | "
        f"{jax_ratio:.2f} | {fmt(cell['torch', 'group'])} | {fmt(cell['torch', 'dp'])} | "
        f"{torch_ratio:.2f} (CPU) | "
        f"**{cell['bnfree_jax', 'dp'][1] / cell['torch', 'dp'][1]:.2f}** "
        f"({cell['bnfree_jax', 'dp'][0] / cell['torch', 'dp'][0]:.2f}) | "
        f"{statistics.median(per_round):.2f} ({min(per_round):.2f}-{max(per_round):.2f}) |")
  return '\n'.join(lines) + '\n'


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--peer-python', help='a Python with torch, torchvision, opacus (to measure)')
  p.add_argument('--core', type=int, default=0)
  p.add_argument('--rounds', type=int, default=2)
  p.add_argument('--steps', type=int, default=5)
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--shapes', default=','.join(SHAPES), help=' | '.join(SHAPES))
  p.add_argument('--out', required=True, help='writes OUT.json and OUT.md')
  p.add_argument('--table-only', action='store_true',
                 help='rewrite OUT.md from an existing OUT.json')
  args = p.parse_args(argv)
  if args.table_only:
    with open(args.out + '.md', 'w') as f:
      f.write(table(json.load(open(args.out + '.json'))))
    return 0
  if not args.peer_python:
    p.error('--peer-python is needed to measure (only --table-only goes without it)')
  args.shapes = args.shapes.split(',')
  for shape in args.shapes:
    if shape not in SHAPES:
      p.error(f'--shapes {shape!r} is not one of: {", ".join(SHAPES)}')
  records = measure(args)
  with open(args.out + '.json', 'w') as f:
    json.dump(records, f, indent=1)
  with open(args.out + '.md', 'w') as f:
    f.write(table(records))
  print(table(records))
  return 0


if __name__ == '__main__':
  sys.exit(main())
