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

On a GPU, the suite (bench/suite.py): both models, four variants, two dtypes,
MFU, the PyTorch peer and the trainer end to end, within a time budget:

  python -m bnfree_jax.bench --suite gpu --json OUT.json --md OUT.md \
      [--peer-python PYTHON] [--budget-s 470] [--dry-run]

Input pipeline alone (images/s), beside the train step's consumption:

  python -m bnfree_jax.bench --input imagenet,fashion_mnist --batch-size 128 --seconds 20

XLA:CPU settings, each in its own process (XLA reads its flags once, at
backend start), the processes taking turns round by round with a default one:

  python -m bnfree_jax.bench --sweep-cpu-flags --steps 8 \
      [--cpu-flags='--xla_cpu_use_onednn=true;JAX_NUM_CPU_DEVICES=2']

A code change against the code before it, the same way (DIR: a checkout of
the commit before, e.g. `git archive BASE | tar -x -C DIR`):

  python -m bnfree_jax.bench --sweep-cpu-flags --baseline DIR --steps 8

On a CPU host the step runs on one CPU device per core, as in the trainer
(runtime.use_cpu_cores); JAX_NUM_CPU_DEVICES=1 measures a single device.

Records carry the load average and the cores other processes kept busy: on a
shared machine, read a ratio beside those.

Exit codes: 0 done; 2 bad input, reported in one line naming the allowed values.
"""

import argparse
import os
import platform
import shlex
import sys

import jax

from bnfree_jax import models, runtime
from bnfree_jax.bench import common, cpu_flags, suite, train_step
from bnfree_jax.workdir import EXIT_BAD_INPUT, InputError

INPUTS = ('imagenet', 'fashion_mnist')
SUITES = ('gpu',)
PEERS = ('torch', 'none')
PEER_MODES = ('eager', 'compile')


def _parser():
  p = argparse.ArgumentParser(prog='python -m bnfree_jax.bench',
                              description=__doc__.split('\n')[0])
  p.add_argument('--models', help='comma-separated, e.g. resnet18,resnet50 '
                 '(default: resnet18; the suite: resnet18,resnet50,nf_resnet50)')
  p.add_argument('--variants', default=None,
                 help=f'comma-separated from {", ".join(train_step.VARIANTS)}, each optionally '
                 '+remat and/or +bf16 (default: all; batch,weight for the sweep; '
                 f'{",".join(suite.SUITE_VARIANTS)} for the suite, without options)')
  p.add_argument('--memory-options', action='store_true',
                 help='add V+remat and V+bf16 rows for every variant V')
  p.add_argument('--remat', action='store_true', help='append +remat to every variant')
  p.add_argument('--compute-dtype', default=None,
                 help='float32 | bfloat16 (all variants; default float32, the suite: both)')
  p.add_argument('--batch-size', type=int, default=None,
                 help='16 (train step), 128 (--input); the suite: per device, 256 for '
                 'resnet18, 256 and 128 for resnet50')
  p.add_argument('--image-size', type=int, default=None, help='224')
  p.add_argument('--width', type=int, default=64, help='channels of the first stage')
  p.add_argument('--num-classes', type=int, default=train_step.NUM_CLASSES,
                 help='(train step) ImageNet\'s by default')
  p.add_argument('--channels', type=int, default=train_step.CHANNELS,
                 help='(train step) of the input images')
  p.add_argument('--stem', default='imagenet',
                 help=f'{" | ".join(models.resnet.STEMS)} (small: 3x3 stride 1, no max pool: '
                 'the Fashion-MNIST twin\'s; small_s2: the same at stride 2)')
  p.add_argument('--steps', type=int, default=None,
                 help='timed steps per variant (10; the suite: 20)')
  p.add_argument('--warmup', type=int, default=None,
                 help='untimed steps per variant (2; the suite: 3)')
  p.add_argument('--json', help='write the records here')
  p.add_argument('--md', help='write the printed markdown here')
  p.add_argument('--trace', help='write a jax.profiler trace of the timed steps here '
                 '(the suite: one folder per job, and the peer\'s torch.profiler traces)')
  p.add_argument('--input', help=f'benchmark the input pipeline of: {",".join(INPUTS)}')
  p.add_argument('--seconds', type=float, default=20.0, help='per input pipeline')
  p.add_argument('--steps-json', help='(--input) take the train step consumption from '
                 'this bench JSON instead of measuring it')
  p.add_argument('--sweep-cpu-flags', action='store_true',
                 help='time the step under several XLA:CPU settings, each in a fresh process')
  p.add_argument('--cpu-flags', help="(--sweep-cpu-flags) ';'-separated settings, each XLA "
                 "flags and/or environment variables: --cpu-flags='--xla_a=1;NAME=2 --xla_b=3' "
                 'to try instead of the built-in list')
  p.add_argument('--baseline', help='(--sweep-cpu-flags) a checkout whose code runs the '
                 'default setting: this checkout\'s code (and each --cpu-flags setting) is '
                 'measured against it')
  p.add_argument('--group-size', type=int, default=4,
                 help='(--sweep-cpu-flags) settings whose processes run side by side '
                 '(with a default one); each holds a compiled model in memory')
  p.add_argument('--suite', help=f'run a whole suite: {", ".join(SUITES)}')
  p.add_argument('--dry-run', action='store_true',
                 help='(--suite) every piece at toy sizes on CPU')
  p.add_argument('--budget-s', type=float, default=None,
                 help='(--suite) seconds for the whole suite (470: all in 8 minutes; '
                 'the dry run: 3600)')
  p.add_argument('--peer', default='torch', help=f'(--suite) {" | ".join(PEERS)}')
  p.add_argument('--peer-python', default=sys.executable,
                 help='(--suite) the Python that runs the PyTorch peer (default: this one)')
  p.add_argument('--peer-modes', default=','.join(PEER_MODES),
                 help=f'(--suite) comma-separated from {", ".join(PEER_MODES)}')
  p.add_argument('--e2e-steps', type=int, default=None,
                 help='(--suite) steps of the end-to-end run (200; 0: none)')
  p.add_argument('--lockstep', action='store_true', help=argparse.SUPPRESS)
  p.add_argument('--suite-worker', action='store_true', help=argparse.SUPPRESS)
  p.add_argument('--deadline', type=float, default=float('inf'), help=argparse.SUPPRESS)
  return p


def _one_of(flag, value, allowed):
  if value not in allowed:
    raise InputError(f'{flag} {value!r} is not one of: {", ".join(allowed)}')
  return value


def _defaults(args):
  """Fills the defaults that depend on what is run."""
  toy = args.suite and args.dry_run
  size = suite.DRY_RUN if toy else {}
  args.image_size = args.image_size or size.get('image_size', 224)
  if args.steps is None:
    args.steps = size.get('steps', 20 if args.suite else 10)
  if args.warmup is None:
    args.warmup = size.get('warmup', 3 if args.suite else 2)
  if args.e2e_steps is None:
    args.e2e_steps = size.get('e2e_steps', 200)
  if args.budget_s is None:
    args.budget_s = 3600.0 if toy else 470.0
  if args.batch_size is None and not args.suite:
    args.batch_size = 128 if args.input else 16
  args.models = args.models or (','.join(suite.SUITE_BATCHES) if args.suite else 'resnet18')


def _validate(args):
  _defaults(args)
  for key, minimum in (('steps', 1), ('warmup', 0), ('batch_size', 1), ('image_size', 1),
                       ('width', 1), ('seconds', 0.1), ('group_size', 1), ('e2e_steps', 0),
                       ('budget_s', 1), ('num_classes', 2), ('channels', 1)):
    value = getattr(args, key)
    if value is not None and value < minimum:
      raise InputError(f'--{key.replace("_", "-")}={value} must be >= {minimum}')
  modes = [name for name, on in (('--input', args.input), ('--sweep-cpu-flags', args.sweep_cpu_flags),
                                 ('--suite', args.suite)) if on]
  if len(modes) > 1:
    raise InputError(f'{" and ".join(modes)} cannot be combined: give one of them')
  if modes and (args.num_classes, args.channels) != (train_step.NUM_CLASSES, train_step.CHANNELS):
    raise InputError('--num-classes and --channels apply to the train step only, '
                     f'not to {modes[0]}')
  if args.dry_run and not args.suite:
    raise InputError('--dry-run applies to --suite only')
  _one_of('--stem', args.stem, models.resnet.STEMS)
  if args.baseline and not args.sweep_cpu_flags:
    raise InputError('--baseline applies to --sweep-cpu-flags only')
  if args.trace and (args.input or args.sweep_cpu_flags):
    raise InputError('--trace applies to the train step and --suite, not to '
                     f'{modes[0]}')
  if args.trace:  # The suite's jobs run in the repository: relative to here, not there.
    args.trace = os.path.abspath(args.trace)
  if args.input:
    args.inputs = common.split(args.input)
    for name in args.inputs or ['']:
      _one_of('--input', name, INPUTS)
    return
  args.models = train_step.parse_models(common.split(args.models))
  if args.suite:
    _validate_suite(args)
    return
  if args.sweep_cpu_flags:
    args.flag_sets = (cpu_flags.parse_flag_sets(args.cpu_flags) if args.cpu_flags
                      else cpu_flags.CPU_FLAG_SETS)
    if args.baseline:
      args.flag_sets = cpu_flags.against_baseline(
          args.baseline, args.flag_sets[1:] if args.cpu_flags else ())
  default_variants = 'batch,weight' if args.sweep_cpu_flags else ','.join(train_step.VARIANTS)
  args.variants = train_step.parse_variants(
      common.split(args.variants or default_variants), args.memory_options, args.remat,
      args.compute_dtype or 'float32')
  train_step.rows(args.models, args.variants)


def _validate_suite(args):
  _one_of('--suite', args.suite, SUITES)
  if args.memory_options or args.remat:
    raise InputError('--memory-options and --remat do not apply to --suite')
  args.variants = common.split(args.variants or ','.join(suite.SUITE_VARIANTS))
  for name in args.variants or ['']:
    _one_of('--variants (the suite takes bare variants)', name, list(train_step.VARIANTS))
  train_step.rows(args.models, args.variants)
  args.compute_dtypes = ([_one_of('--compute-dtype', args.compute_dtype, train_step.COMPUTE_DTYPES)]
                         if args.compute_dtype else list(train_step.COMPUTE_DTYPES))
  toy = suite.DRY_RUN['batch_size'] if args.dry_run else None
  args.batch_sizes = {m: (args.batch_size or toy,) if args.batch_size or toy
                      else suite.SUITE_BATCHES.get(m, suite.OTHER_BATCHES) for m in args.models}
  _one_of('--peer', args.peer, PEERS)
  args.peer_modes = [] if args.peer == 'none' else common.split(args.peer_modes)
  for mode in args.peer_modes:
    _one_of('--peer-modes', mode, PEER_MODES)
  if (args.peer_modes and (args.width, args.stem) != (64, 'imagenet')
      and any(m.startswith('nf_') for m in args.models)):
    raise InputError(f'--width {args.width} --stem {args.stem}: the PyTorch peer\'s nf_* models '
                     'are timm\'s, at their own width and stem; leave them out of --models '
                     'or give --peer none')
  if args.peer_modes and models.resnet.STEMS[args.stem].scatter:
    raise InputError(f'--stem {args.stem}: the PyTorch peer has no scattering transform; '
                     'give --peer none')
  if args.peer != 'none' and not os.access(args.peer_python, os.X_OK):
    raise InputError(f'--peer-python {args.peer_python!r} is not an executable file; '
                     'give a Python that has torch and torchvision, or --peer none')


def _emit(args, text, records):
  print(text)
  if args.md:
    common.write_md(args.md, text)
  if args.json:
    common.write_json(args.json, records)


def _suite(args, argv):
  versions, why = suite.probe_peer(args.peer_python) if args.peer_modes else (None, None)
  args.peer_skip = why and f'the PyTorch peer cannot run: {why}'
  args.peer_timm = bool(versions and versions.get('timm_version'))
  meta = dict(suite=args.suite, dry_run=args.dry_run,
              command=shlex.join(['python', '-m', 'bnfree_jax.bench', *argv]),
              budget_s=args.budget_s, image_size=args.image_size, steps=args.steps,
              warmup=args.warmup, jax_version=jax.__version__, host=platform.node(),
              peer_python=args.peer_python if args.peer_modes else None, peer=versions,
              peer_skipped=args.peer_skip)
  records = suite.run_suite(args, meta)
  _emit(args, suite.markdown(records), records)
  return 0


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  args = _parser().parse_args(argv)
  try:
    _validate(args)
  except InputError as e:
    print(f'error: {e}', file=sys.stderr)
    return EXIT_BAD_INPUT

  if args.suite_worker:
    suite.worker(args)
    return 0
  if args.suite:  # Its workers start JAX's backends; this process does not.
    return _suite(args, argv)
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
      model, variant, args.batch_size, args.image_size, args.width, args.stem,
      args.num_classes, args.channels))
          for model, variant in train_step.rows(args.models, args.variants)]
  # A --lockstep worker of the CPU flag sweep waits for its turn at each phase.
  gate = cpu_flags.lockstep_gate if args.lockstep else (lambda: None)
  try:
    records = train_step.measure_steps(runs, args.steps, args.warmup, gate, args.trace)
  except InputError as e:  # E.g. a batch the devices cannot split evenly.
    print(f'error: {e}', file=sys.stderr)
    return EXIT_BAD_INPUT
  _emit(args, train_step.markdown_table(records), records)
  return 0


if __name__ == '__main__':
  sys.exit(main())
