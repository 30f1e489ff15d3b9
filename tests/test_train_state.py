"""What the train state carries and where it starts: the parameters' moving
average (EMA), label smoothing, per-epoch averages, logs that survive a
preemption bit for bit, and fine-tuning from another run (init_from)."""

import logging

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from bnfree_jax import metrics, report, train
from conftest import load_config

STEPS, DECAY = 12, 0.8


def config(**overrides):
  c = load_config('resnet18_wn.py')
  c.dataset = 'synthetic'
  c.synthetic.update(image_size=8, channels=3, num_classes=4, num_train=64, num_eval=8)
  c.model.update(width=4, stem='small', dropout_rate=0.1)
  c.update(batch_size=16, eval_batch_size=8, num_train_steps=STEPS, log_every_steps=2,
           eval_every_steps=6, checkpoint_every_steps=1, keep_checkpoints=STEPS + 1,
           histogram_every_steps=100, ema_decay=DECAY, label_smoothing=0.1)
  c.lr_schedule.update(base_lr=0.1, warmup_epochs=0.5)
  c.update_from_flattened_dict(overrides)
  return c


class StopAt:
  """A stop flag raised at the n-th step boundary, as SIGTERM would be."""

  def __init__(self, n):
    self.n, self.calls, self.received = n, 0, None

  def requested(self):
    self.calls += 1
    if self.calls == self.n:
      self.received = 'SIGTERM'
    return self.received is not None


def saved(workdir, step):
  with ocp.CheckpointManager(f'{workdir}/checkpoints') as mngr:
    return jax.device_get(mngr.restore(step, args=ocp.args.StandardRestore()))


def logged(workdir):
  """Every logged scalar but the timings, as {tag: {step: value}}."""
  return {tag: dict(zip(steps.astype(int).tolist(), values.tolist()))
          for tag, (steps, values) in report.load_run(str(workdir)).scalars.items()
          if not tag.startswith('perf/') and tag != 'steps_per_sec'}


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('reference')
  train.train_and_evaluate(config(), str(workdir))
  return workdir


def test_ema_is_the_moving_average_of_the_steps_parameters(reference):
  s = train.setup(config())
  ema = jax.device_get(train.init_state(s).params)
  for t in range(STEPS):  # The decay of step t (state.step = t before it), warmed up.
    decay = min(DECAY, (1 + t) / (10 + t))
    ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, saved(reference, t + 1)['params'])
  final = saved(reference, STEPS)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               final['ema']['params'], ema)
  values = logged(reference)
  assert set(values['eval_ema/top1']) == {6, 12}
  assert values['eval_ema/loss'] != values['eval/loss']  # A different model was scored.


def test_label_smoothing_is_the_training_loss():
  logits = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
  labels = np.array([0, 3, 1, 1, 2])
  loss = metrics.per_example(logits, labels, 0.1)['loss']
  expected = optax.softmax_cross_entropy(logits, optax.smooth_labels(np.eye(4)[labels], 0.1))
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  log_p = jax.nn.log_softmax(logits)  # (1 - a) CE + a * mean over classes of -log p.
  by_hand = -(0.9 * log_p[np.arange(5), labels] + 0.1 * log_p.mean(-1))
  np.testing.assert_allclose(loss, by_hand, rtol=1e-5)
  plain = metrics.per_example(logits, labels)['loss']
  np.testing.assert_allclose(plain, -log_p[np.arange(5), labels], rtol=1e-5)


def test_epoch_averages_are_the_epochs_steps(reference):
  values = logged(reference)
  steps_per_epoch = 4  # 64 examples / 16.
  assert set(values['train_epoch/loss']) == {4, 8, 12}
  for end in (4, 8, 12):  # Two log intervals of two steps each make an epoch.
    halves = [values['train/loss'][end - 2], values['train/loss'][end]]
    assert values['train_epoch/loss'][end] == pytest.approx(np.mean(halves), rel=1e-6)
    assert end % steps_per_epoch == 0


def test_a_preempted_run_logs_and_ends_exactly_as_an_uninterrupted_one(reference, tmp_path):
  """Stopped at step 5, between the log steps 4 and 6 and inside an epoch:
  the rerun's logs and state equal the uninterrupted run's, bit for bit."""
  with pytest.raises(train.Preempted):
    train.train_and_evaluate(config(), str(tmp_path), stop=StopAt(5))
  assert sorted(ocp.CheckpointManager(f'{tmp_path}/checkpoints').all_steps())[-1] == 5
  train.train_and_evaluate(config(), str(tmp_path))
  assert logged(tmp_path) == logged(reference)
  jax.tree.map(np.testing.assert_array_equal, saved(tmp_path, STEPS), saved(reference, STEPS))


def test_fine_tuning_loads_all_but_a_head_of_another_class_count(reference, tmp_path, caplog):
  c = config(**{'synthetic.num_classes': 3, 'init_from': str(reference), 'ema_decay': 0.0})
  s = train.setup(c)
  fresh = train.init_state(s)
  with caplog.at_level(logging.INFO):
    state = jax.device_get(train._start_from(s, fresh, str(reference)))
  source = saved(reference, STEPS)
  assert 'init_from' in caplog.text and f'(step {STEPS})' in caplog.text
  assert 'new: head/bias (3,) (was (4,)), head/kernel (32, 3) (was (32, 4))' in caplog.text
  for name, value in state.params.items():
    want = jax.device_get(fresh.params['head']) if name == 'head' else source['params'][name]
    jax.tree.map(np.testing.assert_array_equal, value, want)
  assert int(state.step) == 0

  # Through the trainer: it trains from there, and a rerun resumes its own run
  # (the same config both times, so that the step is compiled once).
  tuned = config(**{'synthetic.num_classes': 3, 'init_from': str(reference), 'ema_decay': 0.0,
                    'num_train_steps': 3})
  with pytest.raises(train.Preempted):
    train.train_and_evaluate(tuned, str(tmp_path), stop=StopAt(2))
  with caplog.at_level(logging.INFO):
    train.train_and_evaluate(tuned, str(tmp_path))
  assert 'ignored: the run resumes from its own checkpoint' in caplog.text
  assert int(saved(tmp_path, 3)['step']) == 3


def test_fine_tuning_from_another_model_is_refused(reference, tmp_path):
  c = config(**{'model.width': 8, 'init_from': str(reference)})
  with pytest.raises(train.InputError, match=r"init_from=.*: params stage1_block0/conv1/bias is "
                     r'\(4,\), resnet18 needs \(8,\): another model'):
    train.train_and_evaluate(c, str(tmp_path))
