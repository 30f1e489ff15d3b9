"""checkpointing: restore falls back past damaged checkpoints and moves them
aside (never deleting them), leftovers of a killed save are ignored, and a
state that fits no checkpoint is an error rather than a fresh start. Small
trees, no training: seconds."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from bnfree_jax import checkpointing


def tree(step):
  return {'w': jnp.full((4, 3), float(step)), 'step': jnp.asarray(step, jnp.int32)}


def abstract():
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                      tree(0))


def saved(workdir, steps, keep=3):
  mngr = checkpointing.manager(str(workdir), keep=keep)
  for step in steps:
    checkpointing.save(mngr, step, tree(step))
  mngr.wait_until_finished()
  return mngr


def test_corrupt_newest_falls_back_and_is_moved_aside(tmp_path, caplog):
  saved(tmp_path, [1, 2, 3]).close()
  ckpts = tmp_path / 'checkpoints'
  helpers.damage_checkpoint(ckpts / '3')
  mngr = checkpointing.manager(str(tmp_path), keep=3)
  with caplog.at_level(logging.WARNING):
    state = checkpointing.restore_latest(mngr, abstract())
  assert int(state['step']) == 2
  np.testing.assert_array_equal(state['w'], np.full((4, 3), 2.0))
  assert any('step 3' in r.getMessage() and 'cannot be read' in r.getMessage()
             for r in caplog.records), caplog.text
  aside = [p.name for p in ckpts.iterdir() if p.name.startswith('3.corrupt-')]
  assert len(aside) == 1, sorted(p.name for p in ckpts.iterdir())
  assert mngr.all_steps() == [1, 2] and mngr.latest_step() == 2

  # Training goes on: step 3 can be saved again, and the LatestN policy
  # (keep=2 here) never reaches the moved checkpoint.
  mngr.close()
  mngr = saved(tmp_path, [3, 4, 5], keep=2)
  assert mngr.all_steps() == [4, 5]
  assert (ckpts / aside[0]).is_dir()
  mngr.close()


def test_leftover_of_a_killed_save_is_ignored_and_removed(tmp_path):
  saved(tmp_path, [1]).close()
  leftover = tmp_path / 'checkpoints' / '2.orbax-checkpoint-tmp-1234'
  (leftover / 'default').mkdir(parents=True)
  mngr = checkpointing.manager(str(tmp_path), keep=3)
  assert int(checkpointing.restore_latest(mngr, abstract())['step']) == 1
  checkpointing.save(mngr, 2, tree(2))
  mngr.wait_until_finished()
  assert mngr.all_steps() == [1, 2] and not leftover.exists()
  mngr.close()


def test_no_readable_checkpoint_is_an_error_and_moves_nothing(tmp_path):
  saved(tmp_path, [1, 2]).close()
  mngr = checkpointing.manager(str(tmp_path), keep=3)
  # Another train state (a changed optimizer, say) fits none of them.
  other = {'w': jax.ShapeDtypeStruct((5,), jnp.float32, sharding=abstract()['w'].sharding)}
  with pytest.raises(checkpointing.NoReadableCheckpointError, match=r'steps 2, 1'):
    checkpointing.restore_latest(mngr, other)
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['1', '2']
  mngr.close()


def test_empty_workdir_restores_nothing(tmp_path):
  mngr = checkpointing.manager(str(tmp_path), keep=3)
  assert checkpointing.restore_latest(mngr, abstract()) is None
  mngr.close()
