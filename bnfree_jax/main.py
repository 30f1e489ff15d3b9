"""Trains, or evaluates, one run; a rerun resumes it from its newest checkpoint.

usage: python -m bnfree_jax.main --config CONFIG.py[:arg] --workdir DIR [--config.key=value ...]

  --config CONFIG.py[:arg]  a recipe file (configs/*.py, or a file anywhere)
                            whose get_config(arg) returns the run's settings;
                            every key and its meaning: configs/default.py.
  --config.key=value        overrides one setting, e.g. --config.batch_size=512
                            --config.lr_schedule.base_lr=0.2; an unknown key is
                            an error.
  --workdir DIR             checkpoints, TensorBoard events and config.json;
                            view with `tensorboard --logdir DIR`.
  --coordinator_address HOST:PORT --num_processes N --process_id I
                            a multi-process run (else SLURM's, Open MPI's or
                            JAX's own environment is read when present).

Exit codes: 0 done; 2 bad input (config, data, workdir, or a workdir another
run is using: its lock, WORKDIR/lock), reported in one line before anything
is compiled; 3 the loss or gradient became non-finite, or the loss diverged
(config.on_divergence); 74 a checkpoint or the event log could not be written
(a full disk, a read-only filesystem: the message names the path and the
newest complete checkpoint, which a rerun resumes); 75 preempted by
SIGTERM/SIGINT after saving a checkpoint (rerun to resume).
"""

import contextlib
import logging
import os
import re
import sys
import traceback

# TF serves input only (where the data needs it): silence its start-up chatter.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from bnfree_jax.workdir import EXIT_BAD_INPUT  # noqa: E402

# 74 and 75: sysexits.h's EX_IOERR and EX_TEMPFAIL.
EXIT_NONFINITE, EXIT_UNWRITABLE, EXIT_PREEMPTED = 3, 74, 75
HELP_FLAGS = ('-h', '--help', '--helpshort', '--helpfull')


def parse_flags(argv, define) -> flags.FlagValues:
  """--config (a recipe file, loaded and locked) and the flags that
  define(flag_values) adds, parsed from argv; raises one of CONFIG_ERRORS.

  A fresh set each call, handed argv explicitly: config_flags finds the
  --config.* overrides in its sys_argv (else in sys.argv), so run(argv) parses
  exactly argv, and can be called again in the same process.
  """
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'Config file (CONFIG.py or CONFIG.py:arg).',
                                  flag_values=fv, lock_config=True, sys_argv=argv)
  define(fv)
  fv(argv)
  if fv['config'].present:
    fv.config.keys()  # config_flags defers a failure to load the file to here.
  return fv


def _run_flags(fv):
  """The flags of one run beside --config."""
  flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and config.json.',
                      flag_values=fv)
  flags.DEFINE_string('coordinator_address', None,
                      'HOST:PORT of process 0, for training over several processes.',
                      flag_values=fv)
  flags.DEFINE_integer('num_processes', None, 'Number of processes in a multi-process run.',
                       flag_values=fv)
  flags.DEFINE_integer('process_id', None, 'Index of this process in a multi-process run.',
                       flag_values=fv)


def _fail(code, message):
  print(f'error: {message}', file=sys.stderr)
  return code


def _unknown_key(error) -> str:
  """The error line for a key the locked config refused. A recipe's new key
  comes as 'Key "k" does not exist and cannot be added since the config is
  locked...', an override's as "'k'", either maybe wrapped in an
  AttributeError and followed by a "Did you mean" line."""
  e = error
  while e.args and isinstance(e.args[0], Exception):
    e = e.args[0]
  message = str(e.args[0] if e.args else e)
  hint = re.search(r'Did you mean "[^"]+" instead of "[^"]+"\?', message)
  hint = hint[0] if hint else 'configs/default.py lists the keys'
  in_recipe = re.search(r'Key "([^"]+)" does not exist', message)
  if not in_recipe:
    key = message.splitlines()[0].strip('\'"')
    return f"unknown config key '{key}' in the --config.* overrides ({hint})"
  # The line of the config file (or of a module it calls) that set the key.
  line = [f for f in traceback.extract_tb(error.__traceback__)
          if not re.search(r'/(ml_collections|absl)/', f.filename)][-1]
  return f"unknown config key '{in_recipe[1]}' set at {line.filename}:{line.lineno} ({hint})"


# What parsing the flags and loading a --config file can raise.
CONFIG_ERRORS = (AttributeError, KeyError, flags.Error, ValueError, OSError, SyntaxError)


def config_error(error: Exception) -> str:
  """The one-line message for an error in CONFIG_ERRORS."""
  if isinstance(error, (AttributeError, KeyError)):  # A locked config refuses new keys.
    return _unknown_key(error)
  # The last line of a failed config load names the file and the cause.
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return lines[-1] if lines else type(error).__name__


def parse_cli(argv, define, check, doc):
  """(flag values, None) for a good command line; else (None, exit code)
  after printing `doc` for a help flag, or the one-line error that parsing
  (parse_flags with define) or check(flag values) -> error or None gave."""
  if any(a in HELP_FLAGS for a in argv[1:]):
    print(doc)
    return None, 0
  try:
    fv = parse_flags(argv, define)
    error = check(fv)
  except CONFIG_ERRORS as e:
    error = config_error(e)
  return (None, _fail(EXIT_BAD_INPUT, error)) if error else (fv, None)


def _check_run_flags(fv):
  if fv['config'].present == 0 or fv.workdir is None:
    return '--config and --workdir are both required'
  return None


def run(argv=None) -> int:
  fv, code = parse_cli(sys.argv if argv is None else argv, _run_flags, _check_run_flags, __doc__)
  if fv is None:
    return code
  config, workdir = fv.config, fv.workdir
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s',
                      datefmt='%H:%M:%S', force=True)
  # Keep the console to our progress lines: orbax logs every save in detail.
  for chatty in ('jax', 'absl'):
    logging.getLogger(chatty).setLevel(logging.WARNING)

  from bnfree_jax import runtime, train, workdir as workdirs  # After the flags are fine.
  # From here on SIGTERM/SIGINT only raise a flag, which the training loop
  # reads: a signal while the processes meet, the state is restored or the
  # programs compile still ends the run with a checkpoint and exit code 75.
  with runtime.StopSignals() as stop:
    try:
      if not runtime.initialize_distributed(
          fv.coordinator_address, fv.num_processes, fv.process_id):
        runtime.use_cpu_cores(config.batch_size, config.eval_batch_size)
    except (ValueError, TypeError) as e:
      return _fail(EXIT_BAD_INPUT, str(e))
    # Every check that needs no compilation, so a typo costs seconds, and one
    # process's bad input (data missing on its host, say) stops all of them.
    # The workdir's lock is one of them, held until the run ends.
    with contextlib.ExitStack() as lock:
      try:
        s = train.setup(config)
        workdirs.check_workdir(config, workdir)
        lock.enter_context(workdirs.run_lock(workdir))
        error = None
      except (ValueError, TypeError) as e:  # TypeError: a config value of the wrong type.
        error = str(e)
      error = runtime.first_error_of_all_processes(error)
      if error:
        return _fail(EXIT_BAD_INPUT, error)
      try:
        train.train_and_evaluate(s, workdir, stop=stop)
      except workdirs.InputError as e:
        return _fail(EXIT_BAD_INPUT, str(e))
      except train.NonFiniteError as e:
        return _fail(EXIT_NONFINITE, str(e))
      except workdirs.WriteError as e:
        return _fail(EXIT_UNWRITABLE, str(e))
      except train.Preempted as e:
        logging.info('%s', e)
        return EXIT_PREEMPTED
  return 0


if __name__ == '__main__':
  sys.exit(run())
