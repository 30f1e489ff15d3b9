"""DP-SGD on the device: per-example clipping against single-example
gradients clipped by hand, padding that counts for nothing, the noise's
spread and its independence of the mesh, the update it makes, and a DP run
that resumes bit for bit."""

import contextlib
import functools
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnfree_jax import dp_sgd, input_pipeline, metrics, privacy, report, runtime, train
from bnfree_jax.models import layers
from conftest import REPO, load_config
from test_train_state import StopAt, logged, saved

STEPS, NUM_TRAIN, BATCH = 10, 64, 16


def dp_config(**overrides):
  """tiny_config's weight-normalized ResNet-10 at width 4 on 8-px synthetic
  images, DP with expected batch 16 (q = 1/4) in micro-batches of 8."""
  from helpers import tiny_config
  c = tiny_config(**{
      'synthetic.image_size': 8, 'synthetic.num_train': NUM_TRAIN, 'model.width': 4,
      'model.dropout_rate': 0.0, 'num_train_steps': STEPS, 'log_every_steps': 2,
      'checkpoint_every_steps': 1, 'keep_checkpoints': STEPS + 1, 'eval_every_steps': 5,
      'batch_size': BATCH, 'dp.enabled': True, 'dp.noise_multiplier': 0.7,
      'dp.l2_clip': 0.5, 'dp.microbatch_size': 8, 'grad_clip.mode': 'none',
      **overrides})
  return c


# Plain SGD (no momentum, decay or warm-up), so that the update is -lr times
# the gradient the step made.
PLAIN_SGD = {'optimizer.momentum': 0.0, 'optimizer.weight_decay': 0.0,
             'lr_schedule.name': 'constant', 'lr_schedule.warmup_epochs': 0.0}


@pytest.fixture(scope='module')
def one_device():
  s = train.setup(dp_config(**PLAIN_SGD), devices=jax.devices()[:1])
  return s, train.init_state(s)


def microbatch(s, rows, mask, step=0, garbage=None):
  images, labels = input_pipeline._arrays(s.config, train=True)
  batch = {'image': input_pipeline._normalize(s.config, images[rows]),
           'label': labels[rows].astype(np.int32), 'index': np.asarray(rows, np.int32),
           'mask': np.asarray(mask)}
  if garbage is not None:
    batch['image'][~batch['mask']] = garbage
  return batch


def example_grads_by_hand(s, state, batch, augmult=0):
  """Each real example's gradient, one jax.grad call each (no vmap), with
  the keys the step uses."""
  def loss(params, images, label):
    logits = s.model.apply({'params': params, 'batch_stats': state.batch_stats}, images,
                           train=True, rngs={'dropout': jax.random.key(0)})
    return metrics.per_example(logits, jnp.full(images.shape[:1], label))['loss'].mean()
  grad = jax.jit(jax.grad(loss))  # Compiled once, called per example.
  grads = []
  for image, label, index, real in zip(batch['image'], batch['label'], batch['index'],
                                       batch['mask']):
    if not real:
      continue
    images = image[None] if augmult == 0 else dp_sgd.augment(
        image, jax.random.fold_in(train._step_key(s.config, train._DP_AUGMENT, 0), index),
        augmult)
    grads.append(grad(state.params, images, label))
  return grads


def clip_by_hand(grads, c):
  out = []
  for g in grads:
    norm = math.sqrt(sum(float(np.sum(np.square(np.float64(x)))) for x in jax.tree.leaves(g)))
    out.append(jax.tree.map(lambda x: np.float64(x) * min(1.0, c / (norm + 1e-6)), g))
  return out, [math.sqrt(sum(float(np.sum(np.square(np.float64(x)))) for x in jax.tree.leaves(g)))
               for g in grads]


def check_clipped_sum(s, state, augmult=0, **overrides):
  """dp_sums of six real rows and two padded ones, at a clip norm that clips
  half the examples, against single-example gradients clipped by hand; s's
  config is dp_config(**PLAIN_SGD, **overrides) with dp.augmult and the clip."""
  def at(**dp):
    return train.Setup(**{**vars(s), 'config': dp_config(**PLAIN_SGD, **overrides, **dp)})
  s = at(**{'dp.augmult': augmult})
  batch = microbatch(s, [3, 9, 12, 20, 33, 41, 0, 0], [True] * 6 + [False] * 2)
  grads = example_grads_by_hand(s, state, batch, augmult)
  _, norms = clip_by_hand(grads, 1.0)
  c = float(np.median(norms))  # Half the examples clipped, half not.
  s = at(**{'dp.augmult': augmult, 'dp.l2_clip': c})
  clipped, _ = clip_by_hand(grads, c)
  sums = jax.jit(functools.partial(train.dp_sums, s=s))(state, batch)
  expected = jax.tree.map(lambda *g: np.sum(g, axis=0), *clipped)
  # float32 rounding, relative to each array's largest entry (sums cancel).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5,
                                                       atol=2e-6 * np.abs(b).max()),
               jax.device_get(sums['grads']), expected)
  assert int(sums['count']) == 6
  assert float(sums['clipped']) == sum(n > c for n in norms) == 3
  assert float(sums['grad_norm']) == pytest.approx(sum(norms), rel=1e-5)
  for g in clipped:  # Each clipped gradient's norm is at most C.
    assert math.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(g))) <= c


@pytest.mark.parametrize('augmult', [0, 2])
def test_clipped_sum_is_single_example_gradients_clipped_by_hand(one_device, augmult):
  check_clipped_sum(*one_device, augmult)


def test_per_example_filter_gradients_are_dots_not_grouped_convolutions(one_device, monkeypatch):
  """dp_sums traces its per-example gradients inside
  layers.per_example_gradients(); without it, XLA's vmapped filter gradient
  is a convolution grouped by the 8 examples, slow on CPU (docs/privacy.md#speed)."""
  s, state = one_device
  batch = microbatch(s, [3, 9, 12, 20, 33, 41, 0, 0], [True] * 6 + [False] * 2)
  program = lambda: str(jax.make_jaxpr(functools.partial(train.dp_sums, s=s))(state, batch))
  assert 'conv_general_dilated' in program() and 'feature_group_count=8' not in program()
  monkeypatch.setattr(layers, 'per_example_gradients', contextlib.nullcontext)
  assert 'feature_group_count=8' in program()


def test_padded_rows_change_nothing(one_device):
  s, state = one_device
  rows, mask = [5, 6, 7, 8, 9, 10, 0, 0], [True] * 6 + [False] * 2
  sums = jax.jit(functools.partial(train.dp_sums, s=s))
  clean = jax.device_get(sums(state, microbatch(s, rows, mask)))
  for garbage in (1e30, np.nan):
    dirty = jax.device_get(sums(state, microbatch(s, rows, mask, garbage=garbage)))
    jax.tree.map(np.testing.assert_array_equal, dirty, clean)
  # Nothing but padding: exactly zero.
  empty = jax.device_get(sums(state, microbatch(s, [0] * 8, [False] * 8)))
  assert all(np.all(x == 0) for x in jax.tree.leaves(empty))


def test_the_histogram_layer_is_not_asked_for_under_dp():
  """No gradient summary is written under DP, so a ResNet-10, which has no
  stage2_block1, trains with the default histogram_layer."""
  default = load_config('default.py').histogram_layer
  assert default == 'stage2_block1/conv2'
  c = dp_config(histogram_layer=default)
  assert train.setup(c).model.stage_sizes == (1, 1, 1, 1)
  with pytest.raises(train.InputError, match="'stage2_block1/conv2' is not a layer of resnet10"):
    train.setup(dp_config(**{'histogram_layer': default, 'dp.enabled': False}))


def test_noise_has_std_sigma_c():
  like = {'a': jnp.zeros((300, 100)), 'b': {'c': jnp.zeros((5, 5, 40, 40))}}
  std = 0.7 * 0.5
  noise = jax.device_get(dp_sgd.gaussian_noise(jax.random.key(1), like, std))
  x = np.concatenate([v.ravel() for v in jax.tree.leaves(noise)])
  n = x.size
  # The sample std of n normals has sd std / sqrt(2 n), the mean std / sqrt(n).
  assert abs(x.std() - std) < 5 * std / math.sqrt(2 * n)
  assert abs(x.mean()) < 5 * std / math.sqrt(n)
  # One draw per leaf, all different: the leaves are not copies of each other.
  assert not np.allclose(noise['a'].ravel()[:25], noise['b']['c'].ravel()[:25])


@pytest.fixture(scope='module')
def first_steps():
  """{devices: (initial params, params after step 0, unit noise of step 0)}
  of the plain-SGD DP run on 1, 2 and 4 devices."""
  out = {}
  for n in (1, 2, 4):
    s = train.setup(dp_config(**PLAIN_SGD), devices=jax.devices()[:n])
    state = train.init_state(s)
    params = jax.device_get(state.params)
    data = jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec('data'))
    batches = [runtime.global_array(data, b) for b in next(input_pipeline.dp_train_batches(
        s.config, start_step=0))]
    noise = jax.device_get(dp_sgd.gaussian_noise(
        train._step_key(s.config, train._DP_NOISE, 0), state.params, 1.0))
    new, finite = train.jit_train_step(s)(state, batches)
    assert bool(finite)
    out[n] = params, jax.device_get(new.params), noise
  return out


def test_the_update_is_the_same_on_1_2_and_4_devices(first_steps):
  params0, params, noise = first_steps[1]
  for n in (2, 4):
    start, p, z = first_steps[n]
    jax.tree.map(np.testing.assert_array_equal, start, params0)
    jax.tree.map(np.testing.assert_array_equal, z, noise)  # The same draw, bit for bit.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), p, params)


# 100 micro-batches a step on a client of 2 CPU devices (the trainer's on a
# 2-core host; with 4, as the tests have, it did not happen): with them all
# queued at once, jaxlib 0.10's CPU client deadlocked in the all-reduce within
# the first step, every time tried.
MANY_MICROBATCHES = textwrap.dedent("""
    import sys
    import jax
    sys.path.insert(0, 'tests')
    from bnfree_jax import runtime, train
    from test_dp_sgd import dp_config, microbatch
    s = train.setup(dp_config(**{'dp.microbatch_size': 2}))
    state = train.init_state(s)
    data = jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec('data'))
    microbatches = [runtime.global_array(data, microbatch(s, [0, 1], [True, True]))] * 100
    step = train.jit_train_step(s)
    state, finite = step(state, microbatches)
    print(int(state.step), bool(finite))
""")


def test_a_step_of_many_microbatches_does_not_deadlock():
  """In a subprocess, so that a deadlock fails the test at its timeout
  instead of hanging the suite."""
  out = subprocess.run([sys.executable, '-c', MANY_MICROBATCHES], capture_output=True,
                       text=True, timeout=240, cwd=REPO,
                       env={**os.environ, 'JAX_NUM_CPU_DEVICES': '2'})
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ['1', 'True']


def test_the_update_is_the_noisy_sum_over_the_expected_batch(one_device, first_steps):
  """params - lr (sum + sigma C z) / B, the sum of the clipped gradients
  recomputed micro-batch by micro-batch and z drawn from the step's key."""
  s, state = one_device
  params0, params, z = first_steps[1]
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), params0)
  rows = privacy.sample(s.config.seed, 0, NUM_TRAIN, BATCH / NUM_TRAIN)
  batches = list(privacy.microbatches(rows, 8))
  assert len(batches) >= 2  # The sum spans micro-batches.
  sums = jax.jit(functools.partial(train.dp_sums, s=s))
  total = jax.tree.map(lambda *x: sum(x), *[jax.device_get(sums(state, microbatch(s, r, m)))
                                            for r, m in batches])
  lr, sigma, c = s.config.lr_schedule.base_lr, 0.7, 0.5
  expected = jax.tree.map(lambda p, g, n: p - lr * (g + sigma * c * n) / BATCH,
                          params0, total['grads'], z)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               params, expected)


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('dp_reference')
  train.train_and_evaluate(dp_config(), str(workdir))
  return workdir


def test_a_preempted_dp_run_logs_and_ends_exactly_as_an_uninterrupted_one(reference, tmp_path):
  with pytest.raises(train.Preempted):
    train.train_and_evaluate(dp_config(), str(tmp_path), stop=StopAt(5))
  train.train_and_evaluate(dp_config(), str(tmp_path))
  assert logged(tmp_path) == logged(reference)
  jax.tree.map(np.testing.assert_array_equal, saved(tmp_path, STEPS), saved(reference, STEPS))


def test_the_run_logs_its_epsilon_and_the_examples_it_saw(reference):
  values = logged(reference)
  q = BATCH / NUM_TRAIN
  for step, eps in values['train/epsilon'].items():
    assert eps == pytest.approx(privacy.epsilon(q, 0.7, step, 1e-5), rel=1e-6)
  assert list(values['train/epsilon'].values()) == sorted(values['train/epsilon'].values())
  assert all(v == pytest.approx(0.7) for v in values['train/noise_multiplier'].values())
  assert set(values['train/clip_threshold'].values()) == {0.5}
  assert all(0 <= f <= 1 for f in values['train/clipped_fraction'].values())
  # No gradient summaries: they would publish the non-private gradient.
  assert not any(tag.startswith('grad_') for tag in values)


def test_the_report_tables_the_privacy_spent(reference, tmp_path):
  text = open(report.write_report([str(reference)], str(tmp_path))).read()
  table = text.split('## Differential privacy (DP-SGD)')[1].split('##')[0]
  row = [line for line in table.splitlines() if line.startswith(f'| {reference.name} ')]
  eps = privacy.epsilon(BATCH / NUM_TRAIN, 0.7, STEPS, 1e-5)
  run = report.load_run(str(reference))
  stem = run.config['model']['stem']
  assert len(row) == 1 and (f'| {stem} | {eps:.2f} (1e-05) | 0.700 | 0.5 | {BATCH} | poisson | 0 '
                            '| — |') in row[0]
  # The privacy-utility figure: the run's point at (epsilon spent, final test top-1).
  assert (tmp_path / 'privacy_utility.png').exists() and '![privacy_utility]' in table
  line = report._privacy_utility_figure([run]).axes[0].lines[0]
  top1 = run.scalars['eval/top1'][1][-1]
  assert list(line.get_xdata()) == pytest.approx([eps])
  assert list(line.get_ydata()) == pytest.approx([100 * top1])
