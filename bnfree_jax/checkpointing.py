"""Orbax checkpoints of the train state: periodic async saves, the last N kept,
and restore of the newest checkpoint that can actually be read."""

import logging

import jax
from etils import epath
import orbax.checkpoint as ocp


def manager(workdir, *, keep: int, every_steps: int) -> ocp.CheckpointManager:
  """A manager over WORKDIR/checkpoints.

  Saves are asynchronous, so the next train steps overlap the write; orbax
  writes into a temporary directory and renames it when complete, so a crash
  mid-save never leaves a checkpoint that looks finished.
  """
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=every_steps,
      preservation_policy=ocp.checkpoint_managers.LatestN(keep),
      cleanup_tmp_directories=True,
  )
  return ocp.CheckpointManager(
      epath.Path(workdir).absolute() / 'checkpoints', options=options)


def restore_latest(mngr: ocp.CheckpointManager, abstract_state):
  """The newest readable checkpoint restored into abstract_state's structure
  and shardings, or None when there is none.

  A checkpoint that fails to restore (truncated or corrupted files) is skipped
  with a warning and left on disk for inspection.
  """
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      return mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))
    except Exception as e:  # orbax raises many types for damaged files.
      logging.warning('Checkpoint at step %d in %s cannot be read (%s: %s); '
                      'trying an older one.', step, mngr.directory,
                      type(e).__name__, str(e).splitlines()[0] if str(e) else '')
  return None


def save(mngr: ocp.CheckpointManager, step: int, state, *, force=False) -> bool:
  return mngr.save(step, args=ocp.args.StandardSave(state), force=force)


def abstract(state):
  """Shape, dtype and sharding of every leaf: what restore needs to rebuild it."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
