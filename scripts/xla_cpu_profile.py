"""Where an XLA:CPU train step's time goes, by class of operation, from a
bench trace and the step's optimized HLO:

  XLA_FLAGS="--xla_dump_to=DUMP --xla_dump_hlo_as_text" JAX_NUM_CPU_DEVICES=1 \
      python -m bnfree_jax.bench --models resnet18 --variants weight --steps 3 --trace TRACE
  python scripts/xla_cpu_profile.py DUMP TRACE --steps 3 --batch-size 16

(results/bench/cpu_gap.md has its tables.) For the DP-SGD step, trace the
bench's `--variants dp` and give `--program accumulate`: its per-example
gradients of one micro-batch.

Each thunk of the trace is the HLO instruction of its name; its class comes
from the instruction's op_name (what JAX traced it from): the max pool's
forward (reduce_window_max) and gradient (the ResNet's own selects and pads
outside any block), convolutions forward, their input gradients (the
output's leading dimension is the batch) and filter gradients (it is not),
dots (1x1 convolutions) likewise; convolutions without an op_name are
filter gradients (XLA:CPU's rewrite of them keeps no metadata), other
operations without one the max pool's gradient (select-and-scatter's
expansion into iotas, an argmax and a scatter keeps none either); XLA's
transposes and copies; and the rest (elementwise, reductions, the
optimizer). Milliseconds per step: thunk wall time summed over the trace's
timed steps, so on a loaded machine read the shares, not the milliseconds.
"""

import argparse
import collections
import glob
import gzip
import json
import re

from bnfree_jax.models import layers

LINE = re.compile(r'^\s*(?:ROOT )?%(\S+) = (\S+?)(?:\{[^}]*\})? (\S+?)\(')
OP_NAME = re.compile(r'op_name="([^"]*)"')


def instructions(dump, program='train_step'):
  """name -> (opcode, output shape, op_name) of the jitted program's entry computation."""
  path, = glob.glob(f'{dump}/*jit_{program}.cpu_after_optimizations.txt')
  out, entry = {}, False
  for line in open(path):
    entry = entry or line.startswith('ENTRY')
    m = LINE.match(line)
    if entry and m:
      op = OP_NAME.search(line)
      out[m.group(1)] = (m.group(3), m.group(2), op.group(1) if op else '')
  return out


def classify(name, opcode, shape, op_name, batch):
  backward = re.search(r'transpose\((vmap\()?jvp\(', op_name)
  dims = [int(d) for d in re.findall(r'\d+', shape.split('[', 1)[-1].split(']')[0])]
  into_batch = bool(dims) and dims[0] == batch
  if layers.PER_EXAMPLE_FILTER_GRAD in op_name:
    return 'conv filter gradient'
  if 'reduce_window' in op_name:
    return 'max pool forward'
  if backward and re.search(r'jvp\(\w+\)\)/(select_and_scatter|select_n|jit\(_pad\)/pad|pad|'
                            r'add|concatenate|reshape|slice)$', op_name):
    return 'max pool gradient'
  if 'transpose' in name or opcode in ('transpose', 'copy') or name.startswith('copy'):
    return 'transposes and copies'
  if not op_name and (opcode == 'convolution' or name.startswith('ynn_fusion')):
    return 'conv filter gradient'  # XLA leaves these without metadata.
  if not op_name:
    return 'max pool gradient'
  if 'conv_general_dilated' in op_name or opcode == 'convolution':
    if not backward:
      return 'conv forward'
    return 'conv input gradient' if into_batch else 'conv filter gradient'
  if 'dot_general' in op_name and '/head/' not in op_name:
    if not backward:
      return '1x1 conv (dot) forward'
    return '1x1 conv (dot) input gradient' if into_batch else '1x1 conv (dot) filter gradient'
  return 'elementwise, reductions, optimizer'


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('dump')
  p.add_argument('trace')
  p.add_argument('--steps', type=int, required=True, help='timed steps in the trace')
  p.add_argument('--batch-size', type=int, required=True, help='per device')
  p.add_argument('--program', default='train_step',
                 help="the jitted program to classify: train_step, or DP-SGD's accumulate "
                      '(its per-example gradients of one micro-batch)')
  args = p.parse_args()
  hlo = instructions(args.dump, args.program)
  path, = glob.glob(f'{args.trace}/**/perfetto_trace.json.gz', recursive=True)
  events = json.load(gzip.open(path))
  events = events['traceEvents'] if isinstance(events, dict) else events
  ms = collections.Counter()
  for e in events:
    if e.get('ph') == 'X' and e['name'] in hlo:
      ms[classify(e['name'], *hlo[e['name']], args.batch_size)] += e['dur'] / 1e3 / args.steps
  step = sum(ms.values())
  print('| class | ms per step | share |\n|---|---|---|')
  for cls, t in ms.most_common():
    print(f'| {cls} | {t:.0f} | {t / step:.0%} |')
  print(f'| all thunks | {step:.0f} | |')


if __name__ == '__main__':
  main()
