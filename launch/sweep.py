"""Runs configs one after another, each into its own workdir, resumably.

  python -m launch.sweep --workdir ROOT CONFIG[:arg]... [--list FILE] [-- --config.x=y ...]

Each CONFIG[:arg] runs as
  python -m bnfree_jax.main --config CONFIG[:arg] --workdir ROOT/NAME [overrides]
with NAME the file's stem plus _arg (configs/paper/t1_wn.py:small -> t1_wn_small).
--list FILE adds one CONFIG[:arg] per line (# starts a comment). The overrides
after -- go to every run.

A run whose newest checkpoint is at its last step is skipped; any other is
started with the same command, and the trainer resumes from its checkpoint by
itself. Exit code 75 (preempted, checkpoint saved) reruns it, up to --retries
times; any other failure is reported and the sweep goes on with the next run.
One line per run (prefixed "sweep:"), then a summary. Exit code: 0 when every
run finished, 1 when any did not, 75 when SIGTERM/SIGINT stopped the sweep
itself (run the same command again to go on), 2 for bad arguments.

  python -m launch.sweep --workdir runs/paper_small $(ls configs/paper/[tf]*.py | sed 's/$/:small/')
"""

import argparse
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import time

from bnfree_jax import logs, workdir as workdirs
from bnfree_jax.main import EXIT_NONFINITE, EXIT_PREEMPTED
from bnfree_jax.workdir import EXIT_BAD_INPUT


def run_name(spec: str) -> str:
  path, _, arg = spec.partition(':')
  return re.sub(r'[^\w.-]', '_', pathlib.Path(path).stem + (f'_{arg}' if arg else ''))


def command(spec, workdir, overrides):
  return [sys.executable, '-m', 'bnfree_jax.main', '--config', spec,
          '--workdir', workdir, *overrides]


def total_steps(spec, overrides):
  """The run's step count, from the config loaded as the CLI loads it; None
  when the config does not load (the run itself will then say why)."""
  import jax
  from absl import flags
  from ml_collections import config_flags
  # This process only reads metadata: leave the accelerators to the runs.
  jax.config.update('jax_platforms', 'cpu')
  from bnfree_jax import train
  try:
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file('config', None, '', flag_values=fv)
    fv(['sweep', f'--config={spec}', *(o for o in overrides if o.startswith('--config.'))])
    return train.setup(fv.config).total_steps
  except Exception as e:  # noqa: BLE001 - any failure means "not known finished".
    print(f'sweep: {run_name(spec)}: cannot tell whether it finished ({type(e).__name__}: '
          f'{str(e).splitlines()[0] if str(e) else ""})', flush=True)
    return None


class Stop:
  """SIGTERM/SIGINT to the sweep: pass it on to the running child (which saves
  a checkpoint and exits 75), then start nothing more."""

  def __init__(self):
    self.signum, self.child = None, None
    for sig in (signal.SIGTERM, signal.SIGINT):
      signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    self.signum = signum
    if self.child is not None and self.child.poll() is None:
      self.child.send_signal(signum)


def call(cmd, stop: Stop) -> int:
  stop.child = subprocess.Popen(cmd)
  try:
    return stop.child.wait()
  finally:
    stop.child = None


def describe(rc):
  if rc == 0:
    return 'done'
  if rc < 0:
    return f'killed by {signal.Signals(-rc).name}'
  return {EXIT_BAD_INPUT: 'bad input (exit 2)', EXIT_NONFINITE: 'non-finite (exit 3)',
          EXIT_PREEMPTED: 'preempted (exit 75)'}.get(rc, f'failed (exit {rc})')


def sweep(specs, root, overrides, *, retries=3, run=call, stop=None) -> int:
  stop = stop or Stop()
  counts, t_sweep, bad = {}, time.time(), False
  for spec in specs:
    name = run_name(spec)
    workdir = os.path.join(root, name)
    t0 = time.time()
    step = workdirs.latest_checkpoint_step(workdir) if stop.signum is None else None
    total = total_steps(spec, overrides) if step is not None else None
    if stop.signum is not None:
      status = 'not started'
    elif not os.path.isfile(spec.partition(':')[0]):
      status = 'bad input (no such config file)'
    elif total is not None and step >= total:
      status = f'skipped (finished at step {step})'
    else:
      for attempt in range(retries + 1):
        if attempt:
          print(f'sweep: {name}: preempted, rerunning ({attempt}/{retries})', flush=True)
        rc = run(command(spec, workdir, overrides), stop)
        if rc != EXIT_PREEMPTED or stop.signum is not None:
          break
      status = describe(rc)
    bad |= not status.startswith(('done', 'skipped'))
    key = status.split(' (')[0]
    counts[key] = counts.get(key, 0) + 1
    print(f'sweep: {name:40s} {status:36s} {logs.format_duration(time.time() - t0)}', flush=True)
  summary = ', '.join(f'{n} {k}' for k, n in counts.items())
  print(f'sweep: {len(specs)} runs: {summary}; {logs.format_duration(time.time() - t_sweep)}', flush=True)
  if stop.signum is not None:
    return EXIT_PREEMPTED
  return 1 if bad else 0


def read_list(path):
  with open(path) as f:
    return [line.split('#', 1)[0].strip() for line in f if line.split('#', 1)[0].strip()]


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  overrides = argv[argv.index('--') + 1:] if '--' in argv else []
  argv = argv[:argv.index('--')] if '--' in argv else argv
  parser = argparse.ArgumentParser(
      prog='python -m launch.sweep', description=__doc__.split('\n\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('configs', nargs='*', metavar='CONFIG[:arg]')
  parser.add_argument('--workdir', required=True, help='ROOT: each run goes to ROOT/NAME.')
  parser.add_argument('--list', metavar='FILE', help='More CONFIG[:arg], one per line.')
  parser.add_argument('--retries', type=int, default=3,
                      help='Reruns of a run after exit 75 (preempted). Default 3.')
  parser.add_argument('--dry-run', action='store_true',
                      help='Print the commands; check and run nothing.')
  args = parser.parse_args(argv)  # Exits 2 on bad arguments.

  specs = args.configs + (read_list(args.list) if args.list else [])
  names = [run_name(s) for s in specs]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if not specs or duplicates:
    parser.error(f'two runs would share ROOT/{duplicates[0]}' if duplicates
                 else 'no configs given')
  if args.dry_run:
    for spec in specs:
      print(shlex.join(command(spec, os.path.join(args.workdir, run_name(spec)), overrides)))
    return 0
  return sweep(specs, args.workdir, overrides, retries=args.retries)


if __name__ == '__main__':
  sys.exit(main())
