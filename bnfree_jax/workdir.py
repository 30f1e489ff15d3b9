"""A run's directory: which runs may share it, the lock of the run using it,
its config.json, its newest checkpoint; the one error (with its exit code)
for input that cannot be used: a config value, the data, or the workdir; and
the one for a file of the run that cannot be written."""

import contextlib
import fcntl
import functools
import json
import logging
import os
import socket

import jax

EXIT_BAD_INPUT = 2

# Settings a workdir's runs must share: resuming across them would load
# parameters of another architecture, or mix two experiments in one log. Each
# with the value that a config.json written before the key existed stands for.
RUN_IDENTITY = {'dataset': None, 'train_subset': -1, 'model.name': None, 'model.norm': None,
                'model.width': None, 'model.stem': None}


class InputError(ValueError):
  """A config value, the data or the workdir is unusable."""


class WriteError(RuntimeError):
  """A file of the run (a checkpoint, the event log) could not be written:
  a full disk, a filesystem turned read-only."""


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


@contextlib.contextmanager
def run_lock(workdir):
  """Holds WORKDIR/lock while the run uses workdir, so that a second run
  started on it (another terminal, a requeued job whose predecessor still
  runs) stops with an InputError naming the holder's host and pid. One lock
  per run: process 0 takes it; the other processes learn of its failure as
  of any input error.

  The file holds "HOST PID" under an flock, which the kernel drops when the
  holder dies however it dies; the holder deletes the file when it is done.
  A file whose flock is free was left by a holder that died: on this host it
  is taken over, with a log line. One left by another host stays refused
  (where flocks do not reach across hosts, its holder may still run), and
  the message says to delete it once that process is gone.
  """
  if jax.process_index() != 0:
    yield
    return
  path = os.path.join(workdir, 'lock')
  fd = _lock(path)
  try:
    yield
  finally:
    os.unlink(path)  # Before the flock goes: a waiting run then opens a new file.
    os.close(fd)


def _lock(path) -> int:
  """A descriptor of path holding its flock and this process's name."""
  workdir, host = os.path.dirname(path), socket.gethostname()
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _holder(fd) or 'another run'  # Or one yet to write its name.
      os.close(fd)
      raise InputError(f'workdir {workdir} is in use by {holder} (its lock: {path})') from None
    try:
      current = os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
      current = False
    if not current:  # Its holder deleted it on ending, after our open: once more.
      os.close(fd)
      continue
    holder = _holder(fd)
    if holder and not holder.startswith(f'host {host} '):
      os.close(fd)
      raise InputError(f'workdir {workdir} is in use by {holder} (its lock: {path}); '
                       'if that run has ended, delete the lock')
    if holder:
      logging.warning('Taking over the lock %s of %s, which ended without releasing it.',
                      path, holder)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f'{host} {os.getpid()}\n'.encode(), 0)
    os.fsync(fd)  # Seen from other hosts while the run holds the file open.
    return fd


def _holder(fd) -> str | None:
  """'host HOST pid PID' as the lock file names them, or None if it is empty."""
  words = os.pread(fd, 1024, 0).decode(errors='replace').split()
  return f'host {words[0]} pid {" ".join(words[1:])}' if words else None
