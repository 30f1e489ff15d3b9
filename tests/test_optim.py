"""Schedules, clipping, weight decay and momentum correction against reference numbers."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import helpers
from bnfree_jax import models, optim, train

SPE = 10  # steps per epoch


def lr_at(default_config, total_steps=100, **kw):
  cfg = default_config.lr_schedule
  cfg.update(kw)
  fn = optim.learning_rate_schedule(cfg, SPE, total_steps)
  return lambda step: float(fn(step))


@pytest.mark.parametrize('name,checks', [
    ('constant', {0: 0.4, 57: 0.4, 99: 0.4}),
    ('linear', {0: 0.4, 50: 0.2, 100: 0.0}),
    ('cosine', {0: 0.4, 50: 0.2, 100: 0.0}),
    # Per-epoch staircase: the whole first epoch at base, then x0.5 per epoch.
    ('exponential', {0: 0.4, 9: 0.4, 10: 0.2, 25: 0.1}),
    ('step', {0: 0.4, 29: 0.4, 30: 0.04, 59: 0.04, 60: 0.004, 80: 0.0004}),
    # Triangle min_lr=0.1 -> 0.4 over 2 epochs (20 steps), back down over the next 20.
    ('cyclic', {0: 0.1, 10: 0.25, 20: 0.4, 30: 0.25, 40: 0.1, 60: 0.4}),
])
def test_schedule_values_at_boundaries(default_config, name, checks):
  lr = lr_at(default_config, name=name, base_lr=0.4, end_lr=0.0, decay_rate=0.5,
             step_epochs=(3, 6, 8), step_factor=0.1, min_lr=0.1, cycle_epochs=2)
  for step, want in checks.items():
    assert lr(step) == pytest.approx(want, rel=1e-5, abs=1e-7), (name, step)


@pytest.mark.parametrize('name', optim.LR_SCHEDULES)
def test_warmup_then_schedule(default_config, name):
  lr = lr_at(default_config, name=name, base_lr=0.4, warmup_epochs=2,
             warmup_init_lr=0.04, min_lr=0.1, step_epochs=(5,), decay_rate=0.5)
  assert lr(0) == pytest.approx(0.04)
  assert lr(10) == pytest.approx(0.22)       # half-way through the warm-up
  peak = 0.1 if name == 'cyclic' else 0.4    # cyclic restarts at its minimum
  assert lr(20) == pytest.approx(peak)


def test_linear_after_warmup_reaches_end_at_last_step(default_config):
  lr = lr_at(default_config, name='linear', base_lr=0.5, end_lr=0.01, warmup_epochs=2)
  assert lr(20) == pytest.approx(0.5)
  assert lr(60) == pytest.approx(0.255)
  assert lr(100) == pytest.approx(0.01)


def test_hold_then_linear_decay(default_config):
  # Footnote 6's step decrease: 0.6 for 4 epochs, then linear to 0 over the other 6.
  lr = lr_at(default_config, name='linear', base_lr=0.6, hold_epochs=4)
  checks = {0: 0.6, 39: 0.6, 40: 0.6, 41: 0.59, 70: 0.3, 99: 0.01, 100: 0.0}
  for step, want in checks.items():
    assert lr(step) == pytest.approx(want, abs=1e-7), step


def test_warmup_hold_and_step_epochs_count_from_start(default_config):
  lr = lr_at(default_config, name='step', base_lr=1.0, warmup_epochs=1,
             warmup_init_lr=0.5, hold_epochs=2, step_epochs=(5,), step_factor=0.1)
  checks = {0: 0.5, 5: 0.75, 10: 1.0, 29: 1.0, 30: 1.0, 49: 1.0, 50: 0.1, 99: 0.1}
  for step, want in checks.items():
    assert lr(step) == pytest.approx(want), step


def test_linear_staircase_per_epoch(default_config):
  # 10 epochs of 10 steps, 0.5 -> 0: epoch e holds 0.5 (1 - e / 10) throughout.
  lr = lr_at(default_config, name='linear', base_lr=0.5, staircase_epochs=1)
  checks = {0: 0.5, 9: 0.5, 10: 0.45, 19: 0.45, 55: 0.25, 90: 0.05, 99: 0.05, 100: 0.0}
  for step, want in checks.items():
    assert lr(step) == pytest.approx(want, abs=1e-7), step


def test_staircase_counts_from_the_decay_start(default_config):
  # Warm-up 1 epoch (0.1 -> 1), hold 1 epoch, then 8 epochs to 0 in stairs of
  # 2 epochs (20 steps) counted from step 20: 1, 0.75, 0.5, 0.25.
  lr = lr_at(default_config, name='linear', base_lr=1.0, warmup_epochs=1,
             warmup_init_lr=0.1, hold_epochs=1, staircase_epochs=2)
  checks = {0: 0.1, 5: 0.55, 10: 1.0, 20: 1.0, 39: 1.0, 40: 0.75, 59: 0.75,
            60: 0.5, 80: 0.25, 99: 0.25}
  for step, want in checks.items():
    assert lr(step) == pytest.approx(want, abs=1e-7), step


def test_step_boundaries_count_from_start_despite_warmup(default_config):
  lr = lr_at(default_config, name='step', base_lr=1.0, warmup_epochs=1,
             step_epochs=(3,), step_factor=0.1)
  assert lr(29) == pytest.approx(1.0) and lr(30) == pytest.approx(0.1)


@pytest.mark.parametrize('first,last', [(5.0, 1.0), (5.0, 20.0)])
def test_log_clip_threshold_moves_per_epoch(default_config, first, last):
  cfg = default_config.grad_clip
  cfg.update(mode='log', threshold=first, final_threshold=last)
  fn = optim.clip_threshold_schedule(cfg, SPE, num_epochs=5)
  at = lambda step: float(fn(step))
  ratio = (last / first) ** 0.25
  assert at(0) == pytest.approx(first) and at(9) == pytest.approx(first)
  assert at(10) == pytest.approx(first * ratio, rel=1e-5)
  assert at(20) == pytest.approx(np.sqrt(first * last), rel=1e-5)
  assert at(40) == pytest.approx(last, rel=1e-5) and at(49) == pytest.approx(last, rel=1e-5)


@pytest.mark.parametrize('first,last', [(5.0, 50.0), (10.0, 2.0)])
def test_log_curve_clip_threshold_per_epoch(default_config, first, last):
  cfg = default_config.grad_clip
  cfg.update(mode='log_curve', threshold=first, final_threshold=last)
  fn = optim.clip_threshold_schedule(cfg, SPE, num_epochs=8)
  # first + a ln(1 + epoch), a = (last - first) / ln 8, constant per epoch.
  a = (last - first) / np.log(8)
  for epoch in range(8):
    want = first + a * np.log(1 + epoch)
    for step in (epoch * SPE, epoch * SPE + SPE - 1):
      assert float(fn(step)) == pytest.approx(want, rel=1e-6), (epoch, step)
  assert float(fn(70)) == pytest.approx(last, rel=1e-6)  # The last epoch's value,
  assert float(fn(200)) == pytest.approx(last, rel=1e-6)  # kept after the run.


def test_log_and_log_curve_shapes_differ(default_config):
  cfg = default_config.grad_clip
  cfg.update(threshold=5.0, final_threshold=50.0)
  at = {}
  for mode in ('log', 'log_curve'):
    cfg.mode = mode
    fn = optim.clip_threshold_schedule(cfg, 1, num_epochs=90)
    at[mode] = [float(fn(e)) for e in (0, 1, 44, 89)]
  # Geometric: x10^(1/89) per epoch; log curve: 5 + 10.0004 ln(1 + epoch).
  np.testing.assert_allclose(at['log'], [5.0, 5.13105, 15.6082, 50.0], rtol=1e-5)
  np.testing.assert_allclose(at['log_curve'], [5.0, 11.9318, 43.0682, 50.0], rtol=1e-5)


def make_tx(config, **grad_clip):
  config.grad_clip.update(grad_clip)
  config.lr_schedule.update(name='constant', base_lr=1.0)
  config.optimizer.update(momentum=0.0, weight_decay=0.0)
  return optim.create_optimizer(config, SPE, 50, weight_decay_mask=None)


@pytest.mark.parametrize('scale', [10.0, 0.01])
def test_clipping_to_scheduled_threshold(default_config, scale):
  opt = make_tx(default_config, mode='log', threshold=5.0, final_threshold=1.0)
  params = {'a': jnp.ones((3, 4)), 'b': jnp.ones((5,))}
  grads = jax.tree.map(lambda p: scale * jnp.arange(p.size, dtype=jnp.float32).reshape(p.shape), params)
  state = opt.tx.init(params)
  # Advance to epoch 2 so the threshold is no longer the first one.
  for _ in range(2 * SPE):
    _, state = opt.tx.update(jax.tree.map(jnp.zeros_like, grads), state, params)
  updates, state = opt.tx.update(grads, state, params)
  norm_in, norm_out = optax.tree.norm(grads), optax.tree.norm(updates)
  threshold = float(opt.clip_threshold(2 * SPE))
  assert threshold == pytest.approx(5.0 * 0.2 ** 0.5, rel=1e-5)
  assert float(state[0].hyperparams['max_norm']) == pytest.approx(threshold)
  assert (norm_in > threshold) == (scale > 1)
  if norm_in > threshold:
    assert float(norm_out) == pytest.approx(threshold, rel=1e-5)
  else:
    jax.tree.map(lambda u, g: np.testing.assert_allclose(u, -g, rtol=1e-6), updates, grads)


def test_agc_clips_unitwise_and_spares_the_classifier(default_config):
  opt = make_tx(default_config, mode='agc', agc_clipping=0.01)
  params = {'conv': {'v': jnp.ones((3, 3, 2, 4))}, 'head': {'kernel': jnp.ones((4, 10))}}
  grads = jax.tree.map(lambda p: 100.0 * p, params)
  updates, _ = opt.tx.update(grads, opt.tx.init(params), params)
  # Each output unit of the conv (a 3x3x2 slice) is scaled to 0.01 of its weight norm.
  unit_norms = jnp.sqrt(jnp.sum(updates['conv']['v'] ** 2, axis=(0, 1, 2)))
  np.testing.assert_allclose(unit_norms, 0.01 * np.sqrt(18), rtol=1e-5)
  np.testing.assert_allclose(updates['head']['kernel'], -grads['head']['kernel'])


@pytest.mark.parametrize('decay_on', ['kernels', 'all'])
def test_weight_decay_on_kernels_or_all(default_config, decay_on):
  default_config.lr_schedule.update(name='constant', base_lr=0.5)
  default_config.optimizer.update(momentum=0.0, weight_decay=0.1, weight_decay_on=decay_on)
  params = {'conv': {'v': jnp.full((2,), 3.0), 'g': jnp.full((2,), 2.0),
                     'bias': jnp.full((2,), -1.0)},
            'bn': {'scale': jnp.full((2,), 4.0), 'bias': jnp.full((2,), 0.5)},
            'head': {'kernel': jnp.full((2,), -2.0), 'bias': jnp.full((2,), 1.0)}}
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.2), params)
  opt = optim.create_optimizer(default_config, SPE, 50, weight_decay_mask=models.weight_decay_mask)
  updates, _ = opt.tx.update(grads, opt.tx.init(params), params)
  # PyTorch's SGD step: -lr (grad + wd p) where decayed, -lr grad elsewhere.
  decayed = {('conv', 'v'), ('head', 'kernel')} if decay_on == 'kernels' else None
  for (layer, name), p in flax.traverse_util.flatten_dict(params).items():
    wd = 0.1 if decayed is None or (layer, name) in decayed else 0.0
    np.testing.assert_allclose(updates[layer][name], -0.5 * (0.2 + wd * p), rtol=1e-6,
                               err_msg=f'{decay_on}: {layer}/{name}')


@pytest.mark.parametrize('nesterov', [False, True])
@pytest.mark.parametrize('correction', [True, False])
def test_momentum_correction_matches_goyal(nesterov, correction):
  m, lrs = 0.9, [0.1, 0.1, 0.4, 0.4, 0.05, 0.05]
  lr_fn = lambda count: jnp.asarray(lrs)[count]
  grads = [np.random.RandomState(i).randn(3).astype(np.float32) for i in range(len(lrs))]
  tx = optim.momentum_sgd(lr_fn, m, nesterov, correction)
  state, got = tx.init(jnp.zeros(3)), []
  for g in grads:
    upd, state = tx.update(jnp.asarray(g), state)
    got.append(np.asarray(upd))
  # Goyal et al. eq. (10) with the buffer holding LR-scaled updates, and the
  # momentum correction lr_t/lr_{t-1} applied to it or not.
  v, want, prev = np.zeros(3), [], lrs[0]
  for lr, g in zip(lrs, grads):
    v = m * (lr / prev if correction else 1.0) * v + lr * g
    want.append(-(m * v + lr * g) if nesterov else -v)
    prev = lr
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  if correction:  # The corrected form is optax's own SGD.
    ref = optax.sgd(lr_fn, m, nesterov)
    state = ref.init(jnp.zeros(3))
    for g, w in zip(grads, got):
      upd, state = ref.update(jnp.asarray(g), state)
      np.testing.assert_allclose(upd, w, rtol=1e-5, atol=1e-7)


def test_a_run_shorter_than_its_warmup_only_warms_up(default_config):
  """A smoke run of a recipe (fewer steps than its warm-up and hold) runs:
  the LR rises at the recipe's rate, then holds, for the whole run."""
  lr = lr_at(default_config, total_steps=30, name='cosine', base_lr=0.4, warmup_epochs=4,
             warmup_init_lr=0.0)
  assert [lr(s) for s in (0, 10, 29)] == pytest.approx([0.0, 0.1, 0.4 * 29 / 40])
  lr = lr_at(default_config, total_steps=30, name='cosine', base_lr=0.4, warmup_epochs=2,
             warmup_init_lr=0.0, hold_epochs=3)
  assert [lr(s) for s in (10, 20, 29)] == pytest.approx([0.2, 0.4, 0.4])  # Warm-up, hold.
  default_config.lr_schedule.update(warmup_epochs=2.0)
  assert optim.create_optimizer(default_config, SPE, 5, weight_decay_mask=None).warmup_steps == 20


def test_an_injected_lr_schedule_replaces_the_configs_and_its_warm_up(default_config):
  """lr_find's rising LR: the chain steps with it, the config's warm-up gone."""
  default_config.lr_schedule.update(name='constant', base_lr=0.5, warmup_epochs=2.0)
  default_config.optimizer.update(momentum=0.0, weight_decay=0.0)
  opt = optim.create_optimizer(default_config, SPE, 50, weight_decay_mask=None,
                               learning_rate=lambda count: 0.01 * 2.0 ** count)
  params, grads = {'w': jnp.ones(3)}, {'w': jnp.full(3, 0.5)}
  state = opt.tx.init(params)
  for count in range(3):
    updates, state = opt.tx.update(grads, state, params)
    np.testing.assert_allclose(updates['w'], -0.5 * 0.01 * 2.0 ** count, rtol=1e-6)
  assert opt.warmup_steps == 0 and opt.learning_rate(3) == 0.08


@pytest.mark.parametrize('section,change,message', [
    ('lr_schedule', {'name': 'bogus'}, "lr_schedule.name='bogus' is not one of: constant, linear"),
    ('lr_schedule', {'base_lr': 0.0}, 'lr_schedule.base_lr=0.0 must be > 0'),
    ('lr_schedule', {'base_lr': -0.1}, 'lr_schedule.base_lr=-0.1 must be > 0'),
    ('lr_schedule', {'hold_epochs': -1.0}, 'lr_schedule.hold_epochs=-1.0 must be >= 0'),
    ('lr_schedule', {'staircase_epochs': -0.5}, 'lr_schedule.staircase_epochs=-0.5 must be >= 0'),
    ('grad_clip', {'mode': 'clipit'},
     "grad_clip.mode='clipit' is not one of: none, constant, log, log_curve, agc"),
    ('grad_clip', {'mode': 'log_curve', 'final_threshold': 0.0},
     'grad_clip.final_threshold=0.0 must be > 0'),
    ('grad_clip', {'mode': 'constant', 'threshold': 0.0}, 'grad_clip.threshold=0.0 must be > 0'),
    ('grad_clip', {'mode': 'log', 'final_threshold': -1.0}, 'grad_clip.final_threshold=-1.0 must be > 0'),
    ('optimizer', {'momentum': 1.0}, 'optimizer.momentum=1.0 must lie in [0, 1)'),
    ('optimizer', {'weight_decay_on': 'biases'},
     "optimizer.weight_decay_on='biases' is not one of: kernels, all"),
])
def test_bad_values_raise_naming_them(default_config, section, change, message):
  default_config[section].update(change)
  with pytest.raises(ValueError, match=message.replace('[', r'\[').replace('(', r'\(').replace(')', r'\)')):
    optim.create_optimizer(default_config, SPE, 50, weight_decay_mask=None)


@pytest.mark.parametrize('mode', ['log', 'log_curve'])
def test_clip_threshold_for_short_runs(default_config, mode):
  """Through create_optimizer, which counts a partial last epoch as one: 25
  steps of 10 are 3 epochs, the third reaching final_threshold; a run of one
  epoch or less has nowhere to move, so its threshold stays at the first."""
  default_config.grad_clip.update(mode=mode, threshold=5.0, final_threshold=1.0)
  at = lambda total, steps: [float(optim.create_optimizer(
      default_config, SPE, total, weight_decay_mask=None).clip_threshold(s)) for s in steps]
  middle = 5 / np.sqrt(5) if mode == 'log' else 5 - 4 * np.log(2) / np.log(3)
  assert at(25, [0, 9, 10, 19, 20, 24, 100]) == pytest.approx(
      [5.0, 5.0, middle, middle, 1.0, 1.0, 1.0], rel=1e-6)
  assert at(10, [0, 9, 10, 100]) == [5.0] * 4
  assert at(3, [0, 2]) == [5.0] * 2


def _real_tree_setup(rng, **overrides):
  """train.setup of the trainer's tiny config, and random parameters and
  gradients in the shape of its weight-normalized ResNet-18."""
  s = train.setup(helpers.tiny_config(**overrides))
  abstract = jax.eval_shape(lambda: train.init_state(s)).params
  draw = lambda scale: jax.tree.map(
      lambda a: jnp.asarray(scale * rng.normal(size=a.shape), jnp.float32), abstract)
  return s, draw(1.0), draw


def test_agc_from_the_config_on_the_resnet_tree():
  """grad_clip.mode='agc': every unit of every layer but the classifier,
  WN's g and biases included, gets at most agc_clipping of its parameters'
  norm (a conv's unit: one output channel of v; a vector: all of it)."""
  rng = np.random.default_rng(0)
  s, params, draw = _real_tree_setup(rng, **{
      'grad_clip.mode': 'agc', 'grad_clip.agc_clipping': 0.01, 'optimizer.momentum': 0.0,
      'optimizer.weight_decay': 0.0, 'lr_schedule.name': 'constant', 'lr_schedule.base_lr': 1.0,
      'lr_schedule.warmup_epochs': 0.0})
  params['stage1_block0']['conv1']['bias'] = jnp.zeros(8)  # As initialized: eps takes over.
  grads = draw(100.0)
  updates, _ = jax.jit(s.optimizer.tx.update)(grads, s.optimizer.tx.init(params), params)
  flat = lambda tree: flax.traverse_util.flatten_dict(tree)
  names = set()
  for path, u in flat(updates).items():
    g, p = np.asarray(flat(grads)[path]), np.asarray(flat(params)[path])
    names.add(path[-1])
    if path[0] == 'head':
      want = -g
    else:
      norm = lambda x: np.sqrt(np.sum(x**2, axis=(0, 1, 2) if x.ndim == 4 else None,
                                      keepdims=True))
      limit = 0.01 * np.maximum(norm(p), 1e-3)
      assert (norm(g) > limit).all(), path  # Large gradients: every unit is clipped.
      want = -g * limit / norm(g)
    np.testing.assert_allclose(u, want, rtol=1e-4, err_msg=str(path))
  assert names == {'v', 'g', 'bias', 'kernel'}


@pytest.mark.parametrize('correction', [True, False])
def test_momentum_correction_from_the_config_on_the_resnet_tree(correction):
  """optimizer.momentum_correction reaches the trainer's optimizer: over the
  LR warm-up, the buffer holds gradients (corrected) or LR-scaled updates."""
  rng = np.random.default_rng(1)
  s, params, draw = _real_tree_setup(rng, **{
      'optimizer.momentum_correction': correction, 'optimizer.weight_decay': 0.0,
      'grad_clip.mode': 'none'})
  tx, lr = s.optimizer.tx, s.optimizer.learning_rate
  assert [float(lr(t)) for t in range(3)] == pytest.approx([0.01, 0.0325, 0.055])
  state, buffer = tx.init(params), jax.tree.map(jnp.zeros_like, params)
  for t in range(3):
    grads = draw(1.0)
    updates, state = tx.update(grads, state, params)
    if correction:  # v = m v + g; update -lr_t v.
      buffer = jax.tree.map(lambda v, g: 0.9 * v + g, buffer, grads)
      want = jax.tree.map(lambda v: -lr(t) * v, buffer)
    else:  # v = m v + lr_t g; update -v.
      buffer = jax.tree.map(lambda v, g: 0.9 * v + lr(t) * g, buffer, grads)
      want = jax.tree.map(lambda v: -v, buffer)
    jax.tree.map(lambda u, w: np.testing.assert_allclose(u, w, rtol=1e-5, atol=1e-7),
                 updates, want)
