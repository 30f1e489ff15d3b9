"""A run's directory: which runs may share it, its config.json, its newest
checkpoint; and the one error (with its exit code) for input that cannot be
used: a config value, the data, or the workdir."""

import functools
import json
import os

import jax

EXIT_BAD_INPUT = 2

# Settings a workdir's runs must share: resuming across them would load
# parameters of another architecture, or mix two experiments in one log. Each
# with the value that a config.json written before the key existed stands for.
RUN_IDENTITY = {'dataset': None, 'train_subset': -1, 'model.name': None, 'model.norm': None,
                'model.width': None, 'model.stem': None}


class InputError(ValueError):
  """A config value, the data or the workdir is unusable."""


def check(ok, message: str):
  if not ok:
    raise InputError(message)


def lookup(tree, dotted: str, default=None):
  """tree['a']['b'] for 'a.b', or default where a level is missing."""
  value = functools.reduce(lambda d, k: d.get(k) if isinstance(d, dict) else None,
                           dotted.split('.'), tree)
  return default if value is None else value


def read_config(workdir) -> dict | None:
  """WORKDIR/config.json as a dict, None if there is none."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except ValueError as e:
    raise InputError(f'{path} is not valid JSON ({e}): fix or remove it, or use '
                     'another --workdir') from e


def latest_checkpoint_step(workdir) -> int | None:
  """The newest checkpoint's step, readable or not, or None. Orbax writes a
  checkpoint into a temporary directory and renames it to the bare step
  number when complete."""
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    return None
  return max((int(d) for d in os.listdir(directory) if d.isdigit()), default=None)


def check_workdir(config, workdir):
  """Raises InputError unless workdir can hold this run; creates it."""
  if config.eval_only:
    check(latest_checkpoint_step(workdir) is not None,
          f'workdir {workdir} has no checkpoint to evaluate (config.eval_only=True)')
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise InputError(f'workdir {workdir} cannot be created: {e.strerror}') from e
  check(os.access(workdir, os.W_OK), f'workdir {workdir} is not writable')
  old = read_config(workdir)
  if old is not None:
    new = config.to_dict()
    for key, before in RUN_IDENTITY.items():
      a, b = lookup(old, key, before), lookup(new, key)
      check(a == b, f'workdir {workdir} holds a run with {key}={a!r}, not {b!r}: '
            'use another --workdir')


def prepare_workdir(config, workdir):
  """Refuses a workdir holding a different run, then writes config.json
  (an eval-only run needs a checkpoint and leaves config.json as it is)."""
  check_workdir(config, workdir)
  path = os.path.join(workdir, 'config.json')
  if jax.process_index() == 0 and not config.eval_only:
    # Written aside and renamed: the other processes read it meanwhile, and a
    # half-written file would stop them with a JSON error.
    with open(path + '.tmp', 'w') as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    os.replace(path + '.tmp', path)
