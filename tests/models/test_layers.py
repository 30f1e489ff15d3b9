import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnfree_jax.models import (RELU_GAMMA, DropPath, Dropout, ResNet18, WNConv, WSConv,
                               data_dependent_init)
from bnfree_jax.models.layers import (Conv, GroupedBatchNorm, conv, cpu_max_pool, max_pool,
                                      per_example_gradients)


RNG = np.random.default_rng(0)
# Threefry's compile would dominate these tests on CPU.
KEY = jax.random.key(0, impl='unsafe_rbg')


def _normal(*shape):
  return jnp.asarray(RNG.normal(size=shape), jnp.float32)


def _explicit_conv(x, kernel, bias, strides, padding):
  return jax.lax.conv_general_dilated(
      x, kernel, strides, padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + bias


@pytest.mark.parametrize('strides,padding', [((1, 1), 'SAME'), ((2, 2), ((1, 1), (1, 1)))])
def test_wnconv_equals_conv_with_normalized_kernel(strides, padding):
  v, bias, x = _normal(3, 3, 4, 5), _normal(5), _normal(2, 8, 8, 4)
  g = jnp.asarray(RNG.uniform(0.5, 2.0, size=5), jnp.float32)
  conv = WNConv(5, (3, 3), strides=strides, padding=padding)
  y = conv.apply({'params': {'v': v, 'g': g, 'bias': bias}}, x)

  v64 = np.asarray(v, np.float64)
  kernel = np.asarray(g)[None, None, None] * v64 / np.sqrt((v64**2).sum(axis=(0, 1, 2)))
  expected = _explicit_conv(x, jnp.asarray(kernel, jnp.float32), bias, strides, padding)
  assert y.shape == expected.shape == (2, 8 // strides[0], 8 // strides[1], 5)
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)

  dense = nn.Conv(5, (3, 3), strides=strides, padding=padding)
  np.testing.assert_allclose(
      y, dense.apply({'params': {'kernel': kernel, 'bias': bias}}, x), rtol=1e-5, atol=1e-5)


def test_wnconv_invariant_to_scale_of_v():
  x = _normal(2, 6, 6, 3)
  conv = WNConv(4, (3, 3))
  params = conv.init(KEY, x)['params']
  params = {**params, 'g': params['g'] * 0.3, 'bias': params['bias'] + 0.5}
  scaled = {**params, 'v': params['v'] * 3.7}
  np.testing.assert_allclose(conv.apply({'params': params}, x),
                             conv.apply({'params': scaled}, x), rtol=1e-5, atol=1e-5)


def test_wnconv_initial_kernel_is_v():
  x = _normal(2, 6, 6, 3)
  conv = WNConv(4, (3, 3), padding=((1, 1), (1, 1)))
  params = conv.init(KEY, x)['params']
  assert set(params) == {'v', 'g', 'bias'}
  assert params['v'].shape == (3, 3, 3, 4) and params['g'].shape == params['bias'].shape == (4,)
  np.testing.assert_allclose(params['g'], np.linalg.norm(
      np.asarray(params['v']).reshape(-1, 4), axis=0), rtol=1e-6)
  np.testing.assert_array_equal(params['bias'], 0)
  np.testing.assert_allclose(conv.apply({'params': params}, x),
                             _explicit_conv(x, params['v'], 0.0, (1, 1), ((1, 1), (1, 1))),
                             rtol=1e-5, atol=1e-5)
  # He fan_out init as torchvision: std sqrt(2 / (3 * 3 * 4)).
  big = WNConv(256, (3, 3)).init(KEY, jnp.zeros((1, 4, 4, 64)))['params']['v']
  assert float(jnp.std(big)) == pytest.approx(np.sqrt(2 / (9 * 256)), rel=0.01)


def test_wnconv_bfloat16_compute_keeps_float32_params():
  x = _normal(2, 6, 6, 3)
  conv = WNConv(4, (3, 3), dtype=jnp.bfloat16)
  params = conv.init(KEY, x)['params']
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  y = conv.apply({'params': params}, x)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(y.astype(jnp.float32), WNConv(4, (3, 3)).apply({'params': params}, x),
                             rtol=0.05, atol=0.05)


def _wnconv_outputs(model, variables, x):
  _, state = model.apply(variables, x, train=False, capture_intermediates=(
      lambda mdl, name: isinstance(mdl, WNConv) and name == '__call__'),
      mutable=['intermediates'])
  flat = flax.traverse_util.flatten_dict(state['intermediates'])
  return {path[:-1]: out[0] for path, out in flat.items()}


def test_data_dependent_init_standardizes_every_wnconv():
  model = ResNet18(num_classes=10, norm='weight', width=8, stem='small', dropout_rate=0.1)
  x = _normal(8, 16, 16, 3) * 3.0 + 1.0
  variables = jax.jit(functools.partial(model.init, train=False))(KEY, x)
  before = jax.tree.map(np.array, variables)

  new = data_dependent_init(model, variables, x)

  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.array, variables))
  assert jax.tree.structure(new) == jax.tree.structure(variables)
  old = flax.traverse_util.flatten_dict(variables['params'])
  updated = flax.traverse_util.flatten_dict(new['params'])
  outputs = _wnconv_outputs(model, new, x)
  assert len(outputs) == 1 + 2 * 8 + 3  # stem, two per block, three projections
  for path, y in outputs.items():
    mean, std = np.mean(y, axis=(0, 1, 2)), np.std(y, axis=(0, 1, 2))
    np.testing.assert_allclose(mean, 0, atol=1e-3, err_msg=str(path))
    np.testing.assert_allclose(std, 1, atol=1e-3, err_msg=str(path))
    np.testing.assert_array_equal(updated[path + ('v',)], old[path + ('v',)])
  assert {k for k in updated if not np.array_equal(updated[k], old[k])} == {
      path + (name,) for path in outputs for name in ('g', 'bias')}
  # Without the re-init, deep layers are far from standardized.
  stds = [np.std(y) for y in _wnconv_outputs(model, variables, x).values()]
  assert max(abs(s - 1) for s in stds) > 0.3

  # Under an outer jit (as the trainer calls it) and with remat, which the init pass
  # turns off, the result is the same.
  remat_new = jax.jit(lambda v: data_dependent_init(model.clone(remat=True), v, x))(variables)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), new, remat_new)


def test_data_dependent_init_needs_a_wnconv():
  model = ResNet18(num_classes=10, norm='batch', width=8, stem='small')
  x = jnp.zeros((2, 16, 16, 3))
  variables = jax.eval_shape(lambda: model.init(KEY, x, train=False))
  with pytest.raises(ValueError, match='ResNet has no WNConv'):
    jax.eval_shape(lambda v: data_dependent_init(model, v, x), variables)


@pytest.fixture(scope='module')
def dropped():
  """(x, Dropout(0.1) of x, nn.Dropout(0.1) of x), x of odd channel count."""
  x = jax.random.normal(jax.random.key(0), (64, 8, 8, 65)) + 3.0
  rngs = {'dropout': jax.random.key(1)}
  ours = Dropout(0.1).apply({}, x, rngs=rngs)
  flax_ = nn.Dropout(0.1, deterministic=False).apply({}, x, rngs=rngs)
  return x, ours, flax_


def test_dropout_keeps_and_scales_like_flax(dropped):
  x, ours, flax_ = dropped
  kept = np.asarray(ours) != 0
  np.testing.assert_allclose(np.asarray(ours)[kept], np.asarray(x / 0.9)[kept], rtol=1e-6)
  n = kept.size
  # Keep rate 0.9 within 4 standard deviations, as flax's own mask.
  for mask in (kept, np.asarray(flax_) != 0):
    assert abs(mask.mean() - 0.9) < 4 * np.sqrt(0.09 / n), mask.mean()
  # Both halves of every 32-bit draw are used, not correlated: channel pairs
  # (2k, 2k+1) come from one draw and are kept together as often as chance says.
  both = kept[..., 0:64:2] & kept[..., 1:64:2]
  # 4 standard deviations of the mean of both.size Bernoulli(0.81) pairs
  # (0.0043; this key lands 0.8 of one off).
  assert abs(both.mean() - 0.81) < 4 * np.sqrt(0.81 * 0.19 / both.size), both.mean()


def test_dropout_off_is_identity_and_keys_differ():
  x = jnp.ones((4, 6))
  assert Dropout(0.1, deterministic=True).apply({}, x) is x
  assert Dropout(0.0).apply({}, x, rngs={'dropout': jax.random.key(0)}) is x
  a, b = (Dropout(0.5).apply({}, x, rngs={'dropout': jax.random.key(k)}) for k in (0, 1))
  assert not np.array_equal(a, b)
  assert set(np.unique(a)) <= {0.0, 2.0}


def test_dropout_mask_independent_of_sharding(dropped):
  x, ours, _ = dropped
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = jax.make_mesh((jax.device_count(),), ('data',))
  sharded = jax.device_put(x, NamedSharding(mesh, P('data')))
  apply = jax.jit(lambda x: Dropout(0.1).apply({}, x, rngs={'dropout': jax.random.key(1)}))
  np.testing.assert_array_equal(apply(sharded), ours)


# As the ResNet's BN: flax momentum 0.9 is torchvision's 0.1.
BN = dict(momentum=0.9, epsilon=1e-5)


@pytest.fixture(scope='module')
def bn_case():
  """x of 4 shards with different means and scales, and BN variables."""
  x = _normal(8, 3, 3, 5) * jnp.repeat(jnp.arange(1.0, 5.0), 2)[:, None, None, None]
  x = x + jnp.repeat(jnp.arange(4.0), 2)[:, None, None, None]
  variables = {'params': {'scale': _normal(5), 'bias': _normal(5)},
               'batch_stats': {'mean': _normal(5), 'var': jnp.exp(_normal(5))}}
  return x, variables


def _flax_bn_per_shard(x, variables, groups):
  outs, stats = [], []
  for shard in jnp.split(x, groups):
    y, new = nn.BatchNorm(use_running_average=False, **BN).apply(
        variables, shard, mutable=['batch_stats'])
    outs.append(y)
    stats.append(new['batch_stats'])
  return jnp.concatenate(outs), jax.tree.map(lambda *s: jnp.mean(jnp.stack(s), 0), *stats)


@pytest.mark.parametrize('groups', [1, 2, 4])
def test_grouped_batch_norm_equals_batch_norm_per_shard(bn_case, groups):
  x, variables = bn_case
  y, new = GroupedBatchNorm(groups, **BN).apply(variables, x, mutable=['batch_stats'])
  want_y, want_stats = _flax_bn_per_shard(x, variables, groups)
  np.testing.assert_allclose(y, want_y, atol=1e-6)
  # Running statistics: the mean over shards of what each shard's BN would store.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
               new['batch_stats'], want_stats)
  if groups > 1:  # Per-shard statistics are not the batch's.
    assert np.abs(y - _flax_bn_per_shard(x, variables, 1)[0]).max() > 0.1


def test_grouped_batch_norm_eval_and_variables_match_batch_norm(bn_case):
  x, variables = bn_case
  ours = GroupedBatchNorm(4, use_running_average=True, **BN)
  theirs = nn.BatchNorm(use_running_average=True, **BN)
  np.testing.assert_allclose(ours.apply(variables, x), theirs.apply(variables, x), atol=1e-6)
  init = [jax.tree.map(np.asarray, m.init(KEY, x)) for m in (ours, theirs)]
  jax.tree.map(np.testing.assert_array_equal, *init)
  y = GroupedBatchNorm(4, use_running_average=True, dtype=jnp.bfloat16).apply(variables, x)
  assert y.dtype == jnp.bfloat16


def test_grouped_batch_norm_sharded_needs_no_cross_device_reduction(bn_case):
  from jax.sharding import NamedSharding, PartitionSpec as P
  x, variables = bn_case
  mesh = jax.make_mesh((4,), ('data',))
  sharded = jax.device_put(x, NamedSharding(mesh, P('data')))
  def hlo(module):
    forward = jax.jit(lambda x: module.apply(variables, x, mutable=['batch_stats'])[0])
    return forward(sharded), forward.lower(sharded).compile().as_text()

  y, text = hlo(GroupedBatchNorm(4, **BN))
  np.testing.assert_allclose(y, _flax_bn_per_shard(x, variables, 4)[0], atol=1e-6)
  assert 'all-reduce' not in text
  assert 'all-reduce' in hlo(nn.BatchNorm(use_running_average=False, **BN))[1]


def test_grouped_batch_norm_rejects_uneven_groups(bn_case):
  x, variables = bn_case
  with pytest.raises(ValueError, match='batch 8 is not divisible by num_groups=3'):
    GroupedBatchNorm(3, **BN).apply(variables, x, mutable=['batch_stats'])


def _timm_scaled_std_kernel(w_hwio, gain, gamma, eps):
  """timm's ScaledStdConv2d weight in float64 numpy, from its OIHW view: F.batch_norm
  over (1, O, I*kh*kw) with weight gain * gamma / sqrt(fan_in), biased variance."""
  w = np.asarray(w_hwio, np.float64).transpose(3, 2, 0, 1)
  flat = w.reshape(w.shape[0], -1)
  scale = gamma * flat.shape[1] ** -0.5
  mean, var = flat.mean(axis=1, keepdims=True), flat.var(axis=1, keepdims=True)
  std = (flat - mean) / np.sqrt(var + eps) * (np.asarray(gain, np.float64)[:, None] * scale)
  return std.reshape(w.shape).transpose(2, 3, 1, 0)


@pytest.mark.parametrize('kernel,strides', [(3, 2), (1, 1)])
def test_wsconv_matches_timm_scaled_std_conv(kernel, strides):
  w, bias, x = _normal(kernel, kernel, 6, 5) + 0.1, _normal(5), _normal(2, 9, 9, 6)
  gain = jnp.asarray(RNG.uniform(0.5, 2.0, size=5), jnp.float32)
  padding = ((kernel // 2, kernel // 2),) * 2
  conv = WSConv(5, (kernel, kernel), strides=(strides, strides), padding=padding,
                gamma=RELU_GAMMA)
  # At 1e-3 the weight's variance (~1e-6) is below eps, which then sets the scale.
  for scale in (1.0, 1e-3):
    y = conv.apply({'params': {'kernel': w * scale, 'gain': gain, 'bias': bias}}, x)
    reference = _timm_scaled_std_kernel(w * scale, gain, RELU_GAMMA, 1e-5)
    expected = _explicit_conv(x, jnp.asarray(reference, jnp.float32), bias, (strides, strides),
                              padding)
    side = -(-9 // strides)
    assert y.shape == expected.shape == (2, side, side, 5)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5, err_msg=f'scale {scale}')
  # Invariant to an affine change of the raw weight (up to eps, small beside var ~ 1).
  y = conv.apply({'params': {'kernel': w, 'gain': gain, 'bias': bias}}, x)
  shifted = {'kernel': w * 3.0 - 0.7, 'gain': gain, 'bias': bias}
  np.testing.assert_allclose(conv.apply({'params': shifted}, x), y, rtol=1e-4, atol=1e-4)


def test_wsconv_init_as_timm():
  x = _normal(2, 6, 6, 64)
  params = WSConv(128, (3, 3)).init(KEY, x)['params']
  assert set(params) == {'kernel', 'gain', 'bias'}
  assert params['kernel'].shape == (3, 3, 64, 128) and params['gain'].shape == (128,)
  # kaiming_normal_(mode='fan_in', nonlinearity='linear'): std 1 / sqrt(3 * 3 * 64).
  assert float(jnp.std(params['kernel'])) == pytest.approx(1 / 24, rel=0.01)
  np.testing.assert_array_equal(params['gain'], 1)
  np.testing.assert_array_equal(params['bias'], 0)
  zero = WSConv(4, (1, 1), gain_init=0.0)
  y, variables = zero.init_with_output(KEY, x)
  np.testing.assert_array_equal(variables['params']['gain'], 0)
  np.testing.assert_array_equal(y, 0)


def test_wsconv_bfloat16_compute_keeps_float32_params():
  x = _normal(2, 6, 6, 3)
  conv = WSConv(4, (3, 3), dtype=jnp.bfloat16)
  params = conv.init(KEY, x)['params']
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  y = conv.apply({'params': params}, x)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(y.astype(jnp.float32), WSConv(4, (3, 3)).apply({'params': params}, x),
                             rtol=0.05, atol=0.05)


def test_drop_path_drops_whole_examples():
  x = jnp.ones((4096, 3, 3, 2))
  y = np.asarray(DropPath(0.25).apply({}, x, rngs={'dropout': jax.random.key(0)}))
  per_example = y.reshape(len(y), -1)
  assert set(np.unique(per_example)) == {0.0, np.float32(1 / 0.75)}
  assert np.all(per_example == per_example[:, :1])  # one decision per example
  kept = per_example[:, 0] != 0
  assert abs(kept.mean() - 0.75) < 4 * np.sqrt(0.75 * 0.25 / len(kept))
  again = DropPath(0.25).apply({}, x, rngs={'dropout': jax.random.key(0)})
  np.testing.assert_array_equal(again, y)
  assert DropPath(0.25, deterministic=True).apply({}, x) is x
  assert DropPath(0.0).apply({}, x) is x


def _max_pool_grads(x, window, strides, padding, seed):
  """x's gradient under nn.max_pool (XLA's select-and-scatter) and under
  cpu_max_pool, for the same random output cotangent."""
  reference = functools.partial(nn.max_pool, window_shape=window, strides=strides,
                                padding=padding)
  y, back = jax.vjp(reference, x)
  cotangent = jnp.asarray(np.random.default_rng(seed).normal(size=y.shape), x.dtype)
  y_cpu, back_cpu = jax.vjp(lambda x: cpu_max_pool(x, window, strides, padding), x)
  np.testing.assert_array_equal(y_cpu, y)
  return jax.jit(back)(cotangent)[0], jax.jit(back_cpu)(cotangent)[0]


@pytest.mark.parametrize('window,strides,padding', [
    ((3, 3), (2, 2), ((1, 1), (1, 1))),  # The ResNet stem's.
    ((3, 3), (1, 1), ((1, 1), (1, 1))),
    ((2, 3), (2, 1), ((0, 1), (1, 0))),
    ((3, 2), (3, 2), ((0, 0), (0, 0))),
])
@pytest.mark.parametrize('shape', [(2, 7, 9, 3), (3, 8, 6, 2), (1, 5, 5, 1)])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_cpu_max_pool_gradient_is_select_and_scatters_bit_for_bit(window, strides, padding,
                                                                  shape, dtype):
  """Random cotangents, so that overlapping windows' sums round alike;
  inputs from {0, 1, 2} so that most windows hold tied maxima, and normal
  ones so that a maximum is often chosen by several windows; -inf inputs
  tie with the -inf padding, whose gradient is dropped."""
  rng = np.random.default_rng(3)
  inputs = [rng.integers(0, 3, shape), rng.normal(size=shape),
            np.where(rng.uniform(size=shape) < 0.5, -np.inf, rng.integers(0, 2, shape))]
  for seed, x in enumerate(inputs):
    want, got = _max_pool_grads(jnp.asarray(x, dtype), window, strides, padding, seed)
    assert got.dtype == want.dtype == dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
  # Not vacuous: ties send the gradient to one input of several.
  x = jnp.zeros((1, 5, 5, 1), dtype)
  grads = _max_pool_grads(x, (3, 3), (2, 2), ((1, 1), (1, 1)), 0)
  assert int(jnp.sum(grads[1] != 0)) == 9


def test_max_pool_on_cpu_is_cpu_max_pool():
  x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 6, 6, 2)), jnp.float32)

  def grad_program(pool):
    loss = lambda x: pool(x, (3, 3), (2, 2), ((1, 1), (1, 1))).sum()
    return str(jax.make_jaxpr(jax.grad(loss))(x))

  assert jax.default_backend() == 'cpu'
  assert 'select_and_scatter' in grad_program(
      lambda x, w, s, p: nn.max_pool(x, w, strides=s, padding=p))
  assert 'select_and_scatter' not in grad_program(max_pool)


@pytest.mark.parametrize('kernel,strides,padding', [
    (1, 1, ((0, 0), (0, 0))), (1, 2, ((0, 0), (0, 0))), (1, 2, 'SAME'), (1, 3, 'VALID'),
    (3, 2, ((1, 1), (1, 1))), (1, 1, ((1, 1), (0, 0))), (3, 1, 'SAME'), (3, 2, ((1, 0), (0, 2))),
    (7, 2, ((3, 3), (3, 3)))])
def test_conv_and_its_gradients_equal_lax_conv(kernel, strides, padding):
  """To float32 rounding, for a batch and, vmapped, per example (4 examples
  of 2 images each), outside per_example_gradients() and inside, where the
  per-example filter gradients are dots of shifted slices; the 1x1 unpadded
  ones are dots anyway. The sums round differently. Odd sizes, so strides
  drop pixels. Outside, forward mode works as for lax's."""
  x, w = _normal(4, 2, 7, 9, 5), _normal(kernel, kernel, 5, 4)

  def reference(x, w):
    return jax.lax.conv_general_dilated(x, w, (strides, strides), padding,
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  def ours(x, w):
    return conv(x, w, (strides, strides), padding)

  def ours_per_example(x, w):
    with per_example_gradients():
      return ours(x, w)

  def vjps(f, x, w, cotangent):
    out, back = jax.vjp(f, x, w)
    return out, *back(cotangent)

  cotangent = _normal(4, *reference(x[0], w).shape)
  per_example = jax.vmap(vjps, in_axes=(None, 0, None, 0))
  batch = lambda f: vjps(f, x[0], w, cotangent[0])
  examples = lambda f: per_example(f, x, w, cotangent)
  forward_mode = lambda f: jax.jvp(f, (x[0], w), (x[1], w[::-1]))
  for run, functions in ((batch, (ours, ours_per_example)), (examples, (ours, ours_per_example)),
                         (forward_mode, (ours,))):
    for f in functions:
      for a, b in zip(run(f), run(reference)):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  is_dot = kernel == 1 and (isinstance(padding, str) or padding[0] == (0, 0))
  assert ('conv_general_dilated' in str(jax.make_jaxpr(ours)(x[0], w))) != is_dot
  # XLA's own vmapped filter gradient is a convolution grouped by example.
  grouped = lambda f: 'feature_group_count=4' in str(jax.make_jaxpr(
      lambda x: per_example(f, x, w, cotangent))(x))
  assert grouped(reference) and grouped(ours) != is_dot and not grouped(ours_per_example)


def test_per_example_filter_gradients_in_bfloat16():
  """Under bfloat16 compute, XLA's float32 ones to bfloat16's rounding of
  inputs and result, over 28x28 pixels, and in bfloat16 (custom_vjp wants
  the kernel's dtype back)."""
  x, w, g = _normal(3, 1, 28, 28, 8), _normal(3, 3, 8, 4), _normal(3, 1, 28, 28, 4)

  def filter_grads(dtype):
    grad = lambda x, g: jax.vjp(lambda w: conv(x, w, (1, 1), 'SAME'), w.astype(dtype))[1](g)[0]
    return jax.vmap(grad)(x.astype(dtype), g.astype(dtype))

  want = filter_grads(jnp.float32)
  with per_example_gradients():
    got = filter_grads(jnp.bfloat16)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(got.astype(jnp.float32), want, rtol=0.03, atol=0.03 * np.abs(want).max())


def test_conv_module_is_flax_conv():
  x = _normal(2, 7, 7, 3)
  for kwargs in (dict(kernel_size=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1))),
                 dict(kernel_size=(1, 1), strides=(2, 2), padding=((0, 0), (0, 0)), use_bias=False)):
    ours, flax_conv = Conv(6, **kwargs), nn.Conv(6, **kwargs)
    variables = ours.init(KEY, x)
    jax.tree.map(np.testing.assert_array_equal, variables, flax_conv.init(KEY, x))
    params = jax.tree.map(lambda p: p + _normal(*p.shape), variables)
    np.testing.assert_allclose(ours.apply(params, x), flax_conv.apply(params, x),
                               rtol=1e-5, atol=1e-5)
