"""Benchmarks: the paper's Table 7 (time and memory per normalization) under XLA.

Train step, one table row per model and variant, all variants interleaved in
one process so that their ratios share the machine's state:

  python -m bnfree_jax.bench --models resnet18,resnet50 \
      --variants batch,weight,weight_clip,weight_clip_dropout,none \
      --batch-size 16 --image-size 224 --steps 10 --json OUT.json [--md OUT.md] [--trace DIR]

A variant is a base (the rows of Table 7, plus 'none') with optional memory
options appended: `weight+remat`, `batch+bf16`, `weight+remat+bf16`.
`--memory-options` adds V+remat and V+bf16 for every variant V given;
`--remat` and `--compute-dtype bfloat16` append the option to all of them.

Input pipeline alone (images/s), beside the train step's consumption:

  python -m bnfree_jax.bench --input imagenet,fashion_mnist --batch-size 128 --seconds 20

XLA:CPU settings, each in its own process (XLA reads its flags once, at
backend start), the processes taking turns round by round with a default one:

  python -m bnfree_jax.bench --sweep-cpu-flags --steps 8 \
      [--cpu-flags='--xla_cpu_use_onednn=true;JAX_NUM_CPU_DEVICES=2']

On a CPU host the step runs on one CPU device per core, as in the trainer
(runtime.use_cpu_cores); JAX_NUM_CPU_DEVICES=1 measures a single device.

Records carry the load average and the cores other processes kept busy: on a
shared machine, read a ratio beside those.

Exit codes: 0 done; 2 bad input, reported in one line naming the allowed values.
"""

import argparse
import sys

from bnfree_jax import runtime
from bnfree_jax.bench import common, cpu_flags, train_step
from bnfree_jax.workdir import EXIT_BAD_INPUT, InputError

INPUTS = ('imagenet', 'fashion_mnist')


def _parser():
  p = argparse.ArgumentParser(prog='python -m bnfree_jax.bench',
                              description=__doc__.split('\n')[0])
  p.add_argument('--models', default='resnet18', help='comma-separated, e.g. resnet18,resnet50')
  p.add_argument('--variants', default=None,
                 help=f'comma-separated from {", ".join(train_step.VARIANTS)}, each optionally '
                 '+remat and/or +bf16 (default: all; batch,weight for the sweep)')
  p.add_argument('--memory-options', action='store_true',
                 help='add V+remat and V+bf16 rows for every variant V')
  p.add_argument('--remat', action='store_true', help='append +remat to every variant')
  p.add_argument('--compute-dtype', default='float32', help='float32 | bfloat16 (all variants)')
  p.add_argument('--batch-size', type=int, default=None, help='16 (train step), 128 (--input)')
  p.add_argument('--image-size', type=int, default=224)
  p.add_argument('--width', type=int, default=64, help='channels of the first stage')
  p.add_argument('--steps', type=int, default=10, help='timed steps per variant')
  p.add_argument('--warmup', type=int, default=2, help='untimed steps per variant')
  p.add_argument('--json', help='write the records here')
  p.add_argument('--md', help='write the printed markdown here')
  p.add_argument('--input', help=f'benchmark the input pipeline of: {",".join(INPUTS)}')
  p.add_argument('--seconds', type=float, default=20.0, help='per input pipeline')
  p.add_argument('--steps-json', help='(--input) take the train step consumption from '
                 'this bench JSON instead of measuring it')
  p.add_argument('--sweep-cpu-flags', action='store_true',
                 help='time the step under several XLA:CPU settings, each in a fresh process')
  p.add_argument('--cpu-flags', help="(--sweep-cpu-flags) ';'-separated settings, each XLA "
                 "flags and/or environment variables: --cpu-flags='--xla_a=1;NAME=2 --xla_b=3' "
                 'to try instead of the built-in list')
  p.add_argument('--group-size', type=int, default=4,
                 help='(--sweep-cpu-flags) settings whose processes run side by side '
                 '(with a default one); each holds a compiled model in memory')
  p.add_argument('--lockstep', action='store_true', help=argparse.SUPPRESS)
  return p


def _validate(args):
  for key, minimum in (('steps', 1), ('warmup', 0), ('batch_size', 1), ('image_size', 1),
                       ('width', 1), ('seconds', 0.1), ('group_size', 1)):
    if getattr(args, key) < minimum:
      raise InputError(f'--{key.replace("_", "-")}={getattr(args, key)} must be >= {minimum}')
  if args.input:
    args.inputs = common.split(args.input)
    bad = [i for i in args.inputs if i not in INPUTS]
    if bad:
      raise InputError(f'unknown input {bad[0]!r}; allowed: {", ".join(INPUTS)}')
    return
  args.models = train_step.parse_models(common.split(args.models))
  if args.sweep_cpu_flags:
    args.flag_sets = (cpu_flags.parse_flag_sets(args.cpu_flags) if args.cpu_flags
                      else cpu_flags.CPU_FLAG_SETS)
  default_variants = 'batch,weight' if args.sweep_cpu_flags else ','.join(train_step.VARIANTS)
  args.variants = train_step.parse_variants(common.split(args.variants or default_variants),
                                            args.memory_options, args.remat, args.compute_dtype)


def _emit(args, text, records):
  print(text)
  if args.md:
    common.write_md(args.md, text)
  if args.json:
    common.write_json(args.json, records)


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  if args.batch_size is None:
    args.batch_size = 128 if args.input else 16
  try:
    _validate(args)
  except InputError as e:
    print(f'error: {e}', file=sys.stderr)
    return EXIT_BAD_INPUT

  if args.sweep_cpu_flags:  # Its workers, bench processes themselves, set their devices.
    rows = cpu_flags.sweep_cpu_flags(args, args.flag_sets, args.group_size)
    if all(row['error'] for row in rows if row['label'] == 'default'):
      print(f'error: the default run failed: {rows[0]["error"]}', file=sys.stderr)
      return 1
    _emit(args, cpu_flags.sweep_table(rows), rows)
    return 0

  runtime.use_cpu_cores(args.batch_size)  # As the trainer does, unless JAX_NUM_CPU_DEVICES is set.
  if args.input:
    # Here, not at the top: TensorFlow, which it imports, serves --input only,
    # and the train step must run where TensorFlow is not installed.
    from bnfree_jax.bench import input as input_bench
    rows = input_bench.measure(args.inputs, args.batch_size, args.seconds, args.image_size,
                               args.steps_json)
    _emit(args, input_bench.input_table(rows), rows)
    return 0

  runs = [train_step.Run(model, variant, train_step.variant_config(
      model, variant, args.batch_size, args.image_size, args.width))
          for model in args.models for variant in args.variants]
  # A --lockstep worker of the CPU flag sweep waits for its turn at each phase.
  gate = cpu_flags.lockstep_gate if args.lockstep else (lambda: None)
  try:
    records = train_step.measure_steps(runs, args.steps, args.warmup, gate)
  except InputError as e:  # E.g. a batch the devices cannot split evenly.
    print(f'error: {e}', file=sys.stderr)
    return EXIT_BAD_INPUT
  _emit(args, train_step.markdown_table(records), records)
  return 0


if __name__ == '__main__':
  sys.exit(main())
