"""End-to-end training on synthetic data: loss falls, sharding does not change
the result, resume is exact, the event file holds the promised tags, and eval
scores every example once."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from bnfree_jax import input_pipeline, report, train
from conftest import load_config

STEPS = 40


def tiny_config(**overrides):
  c = load_config('resnet18_wn.py')
  c.dataset = 'synthetic'
  c.synthetic.update(image_size=16, channels=3, num_classes=4, num_train=256, num_eval=10)
  c.model.update(width=8, stem='small', dropout_rate=0.1)
  c.batch_size = 16
  c.eval_batch_size = 4
  c.num_train_steps = STEPS
  # At 0.1 the loss falls well within 40 steps and 1 vs 4 devices stay within
  # 1e-7 at step 16; at 0.05 the trajectory is chaotic enough to amplify
  # summation-order rounding to 1e-3 by then.
  c.lr_schedule.update(base_lr=0.1, warmup_epochs=0.25, warmup_init_lr=0.01)
  c.grad_clip.update(mode='log', threshold=5.0, final_threshold=1.0)
  c.log_every_steps = 10
  c.histogram_every_steps = 20
  c.checkpoint_every_steps = 16
  c.eval_every_steps = 20
  c.update_from_flattened_dict(overrides)
  return c


def final_state(workdir, step=None):
  """(step, state as numpy) of the newest checkpoint, or of `step`."""
  mngr = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'))
  step = step or mngr.latest_step()
  return step, jax.device_get(mngr.restore(step, args=ocp.args.StandardRestore()))


def flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def scalars(workdir):
  """The run as the report reads it, and {tag: [(step, value)]} of its scalars."""
  run = report.load_run(workdir)
  return run, {tag: list(zip(steps.astype(int).tolist(), values.tolist()))
               for tag, (steps, values) in run.scalars.items()}


@pytest.fixture(scope='module')
def run4(tmp_path_factory):
  """The reference run: 4 devices, uninterrupted."""
  workdir = str(tmp_path_factory.mktemp('run4'))
  results = train.train_and_evaluate(tiny_config(), workdir)
  return workdir, results


def test_loss_falls_and_run_ends_with_eval_and_checkpoint(run4):
  workdir, results = run4
  _, values = scalars(workdir)
  losses = [v for _, v in values['train/loss']]
  assert len(losses) == STEPS // 10
  assert losses[-1] < 0.7 * losses[0], losses
  assert [s for s, _ in values['eval/top1']] == [20, 40]
  assert results['eval/top1'] == values['eval/top1'][-1][1]
  step, _ = final_state(workdir)
  assert step == STEPS
  assert os.path.exists(os.path.join(workdir, 'config.json'))


def test_event_file_holds_promised_tags(run4):
  run, values = scalars(run4[0])
  want = {'train/loss', 'train/top1', 'train/top5', 'train/learning_rate',
          'train/grad_norm', 'train/clip_threshold', 'train/clipped_fraction',
          'train/param_norm', 'eval/loss', 'eval/top1', 'eval/top5', 'steps_per_sec'}
  assert want <= set(values), want - set(values)
  assert {'grad_log10_magnitude/stage1', 'grad_log10_magnitude/stem',
          'grad_log10_magnitude/head'} <= set(run.hists)
  assert 'grad_norm/stage1_block0/conv1' in values
  # The logged LR is the one of the interval's last step: 0.1 after a
  # 4-step warm-up, decaying linearly to 0 at step 40.
  lr = dict(values['train/learning_rate'])
  assert lr[10] == pytest.approx(0.1 * (1 - 5 / 36))
  assert dict(values['train/epoch'])[20] == pytest.approx(1.25)
  assert 0.0 <= values['train/clipped_fraction'][0][1] <= 1.0


def test_one_device_equals_four_devices(run4, tmp_path):
  """Same parameters up to float summation order, compared at the first
  checkpoint (step 16): the drift from rounding grows with every step, as it
  does between any two GPU models, so later steps would only measure chaos."""
  workdir = str(tmp_path)
  train.train_and_evaluate(tiny_config(), workdir, devices=jax.devices()[:1])
  one = flat(final_state(workdir, step=16)[1]['params'])
  four = flat(final_state(run4[0], step=16)[1]['params'])
  assert np.linalg.norm(one - four) < 1e-3 * np.linalg.norm(four)
  np.testing.assert_allclose(one, four, atol=1e-3)


def test_killed_run_resumes_exactly(run4, tmp_path, monkeypatch):
  workdir = str(tmp_path)
  real = input_pipeline.train_batches

  def dies_at_step_20(config, *, start_step, **kw):
    for i, batch in enumerate(real(config, start_step=start_step, **kw)):
      if start_step + i == 20:
        raise KeyboardInterrupt('simulated crash')
      yield batch
  monkeypatch.setattr(input_pipeline, 'train_batches', dies_at_step_20)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(tiny_config(), workdir)
  assert final_state(workdir)[0] == 16
  monkeypatch.setattr(input_pipeline, 'train_batches', real)
  train.train_and_evaluate(tiny_config(), workdir)
  _, resumed = final_state(workdir)
  _, uninterrupted = final_state(run4[0])
  jax.tree.map(np.testing.assert_array_equal, resumed, uninterrupted)


def test_eval_counts_every_example_once(run4):
  """eval/top1 over 10 examples in batches of 4 equals a direct computation."""
  config = tiny_config()
  s = train.setup(config)
  _, state = final_state(run4[0])
  images, labels = [], []
  for b in input_pipeline.eval_batches(config, local_batch_size=4, process_index=0,
                                       process_count=1):
    images.append(b['image'][b['mask']])
    labels.append(b['label'][b['mask']])
  images, labels = np.concatenate(images), np.concatenate(labels)
  assert len(labels) == 10
  logits = s.model.apply({'params': state['params'], 'batch_stats': state['batch_stats']},
                         jnp.asarray(images), train=False)
  top1 = float(np.mean(np.argmax(logits, -1) == labels))
  assert run4[1]['eval/top1'] == pytest.approx(top1)
  assert run4[1]['eval/loss'] == pytest.approx(float(jnp.mean(
      jax.nn.logsumexp(logits, -1) - logits[np.arange(10), labels])), rel=1e-5)


def test_use_cpu_cores_splits_batches_evenly_over_cores():
  """In a fresh process (the backend must not have started), on a pretended
  4-core host: the most devices <= 4 that divide every batch; JAX_NUM_CPU_DEVICES wins."""
  code = """
import os, jax
os.sched_getaffinity = lambda pid: set(range(4))
from bnfree_jax import runtime
counts = [runtime.use_cpu_cores(*b) for b in [(6,), (6, 9), (7,), (12, -1)]]
counts.append(runtime.use_cpu_cores(8, 4))
print(counts, jax.device_count())
os.environ['JAX_NUM_CPU_DEVICES'] = '3'
print(runtime.use_cpu_cores(8), jax.device_count())
"""
  env = {k: v for k, v in os.environ.items() if k != 'JAX_NUM_CPU_DEVICES'}
  out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                       check=True).stdout.split('\n')
  assert out[0] == '[3, 3, 1, 4, 4] 4'
  assert out[1] == '3 4'  # Only reported: the backend already has its 4 devices.
