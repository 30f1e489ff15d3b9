"""Orbax checkpoints of the train state: periodic async saves, the last N kept,
and restore of the newest checkpoint that can actually be read.

A checkpoint leaves the disk only through orbax's LatestN policy, which drops
the oldest ones as newer ones complete; one that cannot be read is moved
aside (see restore_latest), never deleted.
"""

import contextlib
import datetime
import logging

import jax
from etils import epath
import orbax.checkpoint as ocp

from bnfree_jax.workdir import WriteError


class NoReadableCheckpointError(ValueError):
  """Checkpoints exist, but none restores into the expected train state."""


def manager(workdir, *, keep: int) -> ocp.CheckpointManager:
  """A manager over WORKDIR/checkpoints.

  Saves are asynchronous, so the next train steps overlap the write; orbax
  writes into a `<step>.orbax-checkpoint-tmp-*` directory and renames it when
  complete, so a crash mid-save never leaves a checkpoint that looks finished.
  Such leftovers of an interrupted save are incomplete by construction, so
  cleanup_tmp_directories removes them when the manager starts.
  """
  options = ocp.CheckpointManagerOptions(
      preservation_policy=ocp.checkpoint_managers.LatestN(keep),
      cleanup_tmp_directories=True,
  )
  return ocp.CheckpointManager(
      epath.Path(workdir).absolute() / 'checkpoints', options=options)


def restore_latest(mngr: ocp.CheckpointManager, abstract_state):
  """The newest readable checkpoint restored into abstract_state's structure
  and shardings, or None when there is no checkpoint.

  A checkpoint newer than the one restored that fails to restore (truncated
  or corrupted files) is renamed to `<step>.corrupt-<UTC time>`, with a
  warning: orbax no longer lists it, so it neither blocks saving that step
  again nor falls to the LatestN policy, and it stays on disk for inspection.
  When no checkpoint restores, a config that changed the train state is more
  likely than damage: nothing is moved, and NoReadableCheckpointError says so.
  """
  steps = sorted(mngr.all_steps(), reverse=True)
  state, errors = None, []
  for step in steps:
    try:
      state = mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))
      break
    except Exception as e:  # orbax raises many types for damaged files.
      errors.append(_first_line(e))
      logging.warning('Checkpoint at step %d in %s cannot be read (%s); trying '
                      'an older one.', step, mngr.directory, errors[-1])
  if state is None and steps:
    raise NoReadableCheckpointError(
        f'no checkpoint in {mngr.directory} (steps {", ".join(map(str, steps))}) '
        "restores into this config's train state; the newest fails with "
        f'{errors[0]}. A changed optimizer or model needs another --workdir; '
        'damaged checkpoints must be moved aside by hand.')
  if errors:
    _move_aside(mngr, steps[:len(errors)])
  return state


def _move_aside(mngr, steps):
  # Every process has tried to read these before the primary renames them,
  # and all wait for the renames before the manager lists its steps again.
  barrier = f'bnfree_jax_move_aside_{"_".join(map(str, steps))}'
  ocp.multihost.sync_global_processes(barrier + '_read')
  if jax.process_index() == 0:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime('%Y%m%dT%H%M%SZ')
    for step in steps:
      path = mngr.directory / str(step)  # The manager's step names carry no prefix.
      target = path.parent / f'{step}.corrupt-{stamp}'
      path.rename(target)
      logging.warning('Moved the unreadable checkpoint of step %d to %s.', step, target)
  ocp.multihost.sync_global_processes(barrier + '_moved')
  mngr.reload()


def save(mngr: ocp.CheckpointManager, step: int, state) -> bool:
  """Starts saving state as `step`; the trainer decides when, so orbax's own
  interval policy is bypassed. Raises WriteError if this save, or the one
  before, which orbax was still writing, failed."""
  with _writing(mngr):
    return mngr.save(step, args=ocp.args.StandardSave(state), force=True)


def wait(mngr: ocp.CheckpointManager):
  """Returns once the save in flight is complete; raises WriteError if it
  failed."""
  with _writing(mngr):
    mngr.wait_until_finished()


@contextlib.contextmanager
def _writing(mngr):
  # Orbax writes in background threads and raises what failed there at the
  # next save or wait, as whatever type the writer raised: OSError (errno 28,
  # no space left; 30, read-only), tensorstore's ValueError, ...
  try:
    yield
  except Exception as e:
    raise WriteError(f'cannot write a checkpoint in {mngr.directory}: {_first_line(e)}') from e


def _first_line(error: Exception) -> str:
  return f'{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ""}'


def read_variables(source: str) -> tuple[int, dict]:
  """(step, {'params', 'batch_stats'} as numpy) of the newest checkpoint of
  workdir `source`, or of the checkpoint directory source = .../STEP."""
  path = epath.Path(source).absolute()
  directory, step = (path / 'checkpoints', None) if (path / 'checkpoints').is_dir() else (
      path.parent, path.name)
  if step is not None and not step.isdigit():
    raise ValueError(f'{source} is neither a workdir (with checkpoints/) nor a checkpoint '
                     'directory (WORKDIR/checkpoints/STEP)')
  with ocp.CheckpointManager(directory) as mngr:
    step = int(step) if step is not None else mngr.latest_step()
    if step is None:
      raise ValueError(f'{source} holds no checkpoint')
    # No target: the tree as saved, whatever optimizer or model wrote it.
    saved = mngr.restore(step, args=ocp.args.StandardRestore())
  return step, {k: jax.device_get(saved.get(k, {})) for k in ('params', 'batch_stats')}
