import functools
import pathlib

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bnfree_jax import convert
from bnfree_jax.models import (MODELS, NFBottleneckBlock, NFResNet, NFResNet18, NFResNet50,
                               create_model, nf_resnet, weight_decay_mask)

# As in test_resnet: unsafe_rbg keys compile much faster on CPU.
KEY = functools.partial(jax.random.key, impl='unsafe_rbg')
TINY = dict(num_classes=10, width=8, stem='small')
X = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)
LABELS = jnp.array([0, 3])
FIXTURE = pathlib.Path(__file__).parents[1] / 'fixtures' / 'timm_nf_resnet50_w4.npz'


def _abstract_variables(model, x):
  return jax.eval_shape(functools.partial(model.init, train=False), KEY(0), x)


def _flat(tree):
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))


def _with_gains(variables, value):
  """Every WSConv gain set to `value`: at init each block's last gain is 0, which
  would hide the residual branches (and stochastic depth with them)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, a: jnp.full_like(a, value) if path[-1].key == 'gain' else a, variables)


# ------------------------------------------------------------ structure ----


# Computed once with timm 1.0.31 (/work/torchenv): sum(p.numel() for p in
# timm.create_model(name).parameters()); timm's nets have no buffers. The
# basic-block nets have torchvision's ResNet-18/34 counts: each BN's affine
# pair became a conv's gain and bias.
@pytest.mark.parametrize('name,expected', [
    ('nf_resnet26', 15_995_176), ('nf_resnet50', 25_557_032), ('nf_resnet101', 44_549_160),
    ('nf_resnet18', 11_689_512), ('nf_resnet34', 21_797_672)])
def test_parameter_count_matches_timm(name, expected):
  variables = _abstract_variables(create_model(name), jnp.zeros((1, 64, 64, 3)))
  assert set(variables) == {'params'}
  assert sum(p.size for p in jax.tree.leaves(variables)) == expected


def test_nf_resnet50_has_timm_channels_betas_and_drop_path_rates():
  model = NFResNet50(drop_path_rate=0.1)
  params = _abstract_variables(model, jnp.zeros((1, 64, 64, 3)))['params']
  shapes = {path: p.shape for path, p in _flat(params).items()}
  assert shapes[('stem_conv', 'kernel')] == (7, 7, 3, 64)
  assert shapes[('stem_conv', 'gain')] == shapes[('stem_conv', 'bias')] == (64,)
  assert shapes[('stage1_block0', 'proj_conv', 'kernel')] == (1, 1, 64, 256)
  assert shapes[('stage1_block0', 'conv1', 'kernel')] == (1, 1, 64, 64)
  assert shapes[('stage2_block0', 'conv2', 'kernel')] == (3, 3, 128, 128)
  assert shapes[('stage4_block2', 'conv3', 'kernel')] == (1, 1, 512, 2048)
  assert shapes[('head', 'kernel')] == (2048, 1000)
  assert {p[0] for p in shapes if 'proj_conv' in p} == {f'stage{i}_block0' for i in range(1, 5)}
  specs = list(model.blocks())
  # The betas of nf_resnet.md, read from timm.
  np.testing.assert_allclose([s.beta for s in specs], [
      1, .9806, .9623, .9449, .9806, .9623, .9449, .9285, .9806, .9623, .9449, .9285, .9129,
      .8980, .9806, .9623], atol=1e-4)
  # timm's calculate_drop_path_rates: linspace(0, rate, blocks), split by stage.
  np.testing.assert_allclose([s.drop_path_rate for s in specs], np.linspace(0, 0.1, 16))
  assert [(s.stage, s.index, s.strides) for s in specs[2:5]] == [(0, 2, 1), (1, 0, 2), (1, 1, 1)]


def test_basic_block_betas_reset_at_projections_only():
  # nf_resnet18's first block keeps its identity shortcut, so the variance keeps growing.
  specs = list(NFResNet18().blocks())
  assert [s.projects for s in specs] == [False, False, True, False, True, False, True, False]
  np.testing.assert_allclose([s.beta**-2 for s in specs],
                             [1, 1.04, 1.08, 1.04, 1.08, 1.04, 1.08, 1.04])


# --------------------------------------------------------- timm weights ----


@pytest.fixture(scope='module')
def timm_fixture():
  """(npz, NFResNet50 at width 4, its variables converted from timm's state dict)."""
  data = np.load(FIXTURE)
  state = {k.removeprefix('state/'): data[k] for k in data.files if k.startswith('state/')}
  model = NFResNet50(width=4, num_classes=5)
  return data, model, state


@pytest.mark.parametrize('size', [64, 65])
def test_converted_timm_weights_give_timm_logits(timm_fixture, size):
  data, model, state = timm_fixture
  variables = convert.from_torch(state, model)
  x = jnp.asarray(data[f'x{size}'].transpose(0, 2, 3, 1))  # NCHW -> NHWC
  logits = jax.jit(functools.partial(model.apply, train=False))(variables, x)
  np.testing.assert_allclose(logits, data[f'logits{size}'], rtol=1e-5, atol=1e-5)


def test_timm_layout_uses_every_key_and_fills_every_param(timm_fixture):
  _, model, state = timm_fixture
  entries = convert.timm_nf_resnet_layout(model, None)
  keys = [key for key, *_ in entries]
  assert len(keys) == len(set(keys)) and set(keys) == set(state)
  assert {t for *_, t in entries} == {'conv', 'linear', 'copy', 'per_filter'}
  variables = convert.from_torch(state, model)
  expected = _flat(_abstract_variables(model, jnp.zeros((1, 32, 32, 3))))
  got = _flat(variables)
  assert set(got) == set(expected)
  assert all(got[k].shape == expected[k].shape for k in got)

  with pytest.raises(ValueError, match=r"state dict has no 'head.fc.bias'; the model expects "
                     r'shape \(5,\)'):
    convert.from_torch({k: v for k, v in state.items() if k != 'head.fc.bias'}, model)
  with pytest.raises(ValueError, match=r"state dict key 'extra' \(shape \(5,\)\) matches no"):
    convert.from_torch({**state, 'extra': state['head.fc.bias']}, model)
  with pytest.raises(ValueError, match=r"'head.fc.weight' has shape \(5, 128\), the model "
                     r'expects \(6, 128\)'):
    convert.from_torch(state, model.clone(num_classes=6))
  with pytest.raises(ValueError, match='timm has no basic-block NF-ResNet'):
    convert.timm_nf_resnet_layout(NFResNet18(), None)
  assert all(np.array_equal(v, state[k]) for k, v in convert.to_torch(variables, model).items())


# ------------------------------------------------------------- numerics ----


def test_signal_propagation_at_init():
  """Brock et al.'s argument, measured with every gain at 1 (live branches):
  after a stage's projecting first block each block's input has the variance
  expected_var predicts, growing by alpha^2 per block, so x * beta enters
  every residual branch at the same variance, of order 1. (Its exact value is
  set by the projection, whose 2x2 average pool in timm's shortcut shrinks
  it: ~0.75 here.)"""
  model = NFResNet(stage_sizes=(1, 8), block_cls=NFBottleneckBlock, **TINY)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(16, 16, 16, 3)), jnp.float32)

  @jax.jit
  def block_input_variances(key):
    variables = _with_gains(model.init(key, x, train=False), 1.0)
    variances = {}

    def record(next_fun, args, kwargs, context):
      if isinstance(context.module, nf_resnet._NFBlock) and context.method_name == '__call__':
        variances[context.module.name] = jnp.var(args[0])
      return next_fun(*args, **kwargs)

    with flax.linen.intercept_methods(record):
      model.apply(variables, x, train=False)
    return variances

  variances = block_input_variances(KEY(0))
  specs = [s for s in model.blocks() if s.stage == 1 and s.index > 0]
  measured = np.array([variances[s.name] for s in specs])
  expected_var = np.array([s.beta**-2 for s in specs])
  np.testing.assert_allclose(expected_var, 1 + 0.04 * np.arange(1, 8))
  np.testing.assert_allclose(measured / measured[0], expected_var / expected_var[0], rtol=0.03)
  after_beta = measured / expected_var
  np.testing.assert_allclose(after_beta, after_beta[0], rtol=0.03)
  assert 0.5 < after_beta.min() and after_beta.max() < 2


@pytest.fixture(scope='module')
def nf18():
  """(model with stochastic depth, its initial variables, a step function):
  the step gives train-mode loss, logits and grads under three dropout keys
  (the first two equal) and eval-mode logits, for the model and its remat
  twin, compiled once. Its key is threefry: unsafe_rbg keys draw differently
  under vmap, the same key included."""
  model = NFResNet18(**TINY, drop_path_rate=0.3)
  variables = jax.jit(functools.partial(model.init, train=False))(KEY(0), X)
  remat = model.clone(remat=True)

  @jax.jit
  def step(variables, key):
    k1, k2 = jax.random.split(key)
    keys = jnp.stack([k1, k1, k2])

    def run(m):
      def loss_fn(params, rng):
        logits = m.apply({'params': params}, X, train=True, rngs={'dropout': rng})
        return optax.softmax_cross_entropy_with_integer_labels(logits, LABELS).mean(), logits

      (loss, train), grads = jax.vmap(jax.value_and_grad(loss_fn, has_aux=True),
                                      in_axes=(None, 0))(variables['params'], keys)
      eval_ = jax.vmap(lambda k: m.apply(variables, X, train=False, rngs={'dropout': k}))(keys)
      return dict(loss=loss, train=train, grads=grads, eval=eval_)

    return run(model), run(remat)

  return model, variables, step


def test_nf_resnet18_forward_backward_from_zero_last_gains(nf18):
  model, variables, step = nf18
  params = _flat(variables['params'])
  for spec in model.blocks():
    np.testing.assert_array_equal(params[(spec.name, 'conv2', 'gain')], 0)
    np.testing.assert_array_equal(params[(spec.name, 'conv1', 'gain')], 1)
  np.testing.assert_array_equal(params[('stage2_block0', 'proj_conv', 'gain')], 1)

  plain, rematted = step(variables, jax.random.key(1))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               plain, rematted)
  assert plain['train'].shape == (3, 2, 10) and plain['train'].dtype == jnp.float32
  assert np.all(np.isfinite(plain['loss'])) and np.all(plain['loss'] > 0)
  grads = _flat(jax.tree.map(lambda g: g[0], plain['grads']))
  assert all(np.all(np.isfinite(g)) for g in grads.values())
  # The zero gains learn first; behind them (conv1) nothing moves yet.
  for spec in model.blocks():
    assert np.any(grads[(spec.name, 'conv2', 'gain')] != 0), spec.name
    np.testing.assert_array_equal(grads[(spec.name, 'conv1', 'kernel')], 0)
  # With every residual branch off, stochastic depth has nothing to drop.
  np.testing.assert_allclose(plain['train'][2], plain['eval'][0], rtol=1e-5, atol=1e-6)


def test_drop_path_in_train_mode_only_and_deterministic_per_key(nf18):
  model, variables, step = nf18
  live = _with_gains(variables, 1.0)
  out, _ = step(live, jax.random.key(1))
  train, eval_ = out['train'], out['eval']
  np.testing.assert_array_equal(train[0], train[1])  # same key, same paths dropped
  assert not np.allclose(train[0], train[2], atol=1e-4)
  assert not np.allclose(train[0], eval_[0], atol=1e-4)
  np.testing.assert_array_equal(eval_[0], eval_[2])  # eval ignores the key
  # In eval mode stochastic depth is the identity: the net without it gives the same.
  plain = jax.jit(functools.partial(model.clone(drop_path_rate=0.0).apply, train=False))(live, X)
  np.testing.assert_allclose(eval_[0], plain, rtol=1e-6, atol=1e-6)


def test_dropout_before_the_head_only():
  model = NFResNet18(**TINY, dropout_rate=0.5)
  variables = _with_gains(jax.jit(functools.partial(model.init, train=False))(KEY(0), X), 1.0)

  @jax.jit
  def run(key):
    """Logits and the last block's output, in train mode under `key` and in eval mode."""
    last_block = lambda m, method: (m.name, method) == ('stage4_block1', '__call__')
    return [model.apply(variables, X, train=train, rngs={'dropout': key},
                        capture_intermediates=last_block, mutable=['intermediates'])
            for train in (True, False)]

  ((a, a_state), (eval_, eval_state)), ((b, _), _) = run(KEY(1)), run(KEY(2))
  assert not np.allclose(a, b, atol=1e-4) and not np.allclose(a, eval_, atol=1e-4)
  features = [s['intermediates']['stage4_block1']['__call__'][0] for s in (a_state, eval_state)]
  np.testing.assert_array_equal(*features)


def test_bfloat16_compute_close_to_float32():
  model = NFResNet18(**TINY)
  variables = _with_gains(jax.jit(functools.partial(model.init, train=False))(KEY(0), X), 1.0)
  # A larger head than timm's N(0, 0.01) init, so logits are not all near 0.
  variables['params']['head']['kernel'] = jnp.asarray(
      np.random.default_rng(2).normal(size=(64, 10)), jnp.float32)
  bf16 = model.clone(dtype=jnp.bfloat16)
  assert {p.dtype for p in jax.tree.leaves(_abstract_variables(bf16, X))} == {
      jnp.dtype(jnp.float32)}
  f32_logits, bf16_logits = jax.jit(lambda v: (model.apply(v, X, train=False),
                                               bf16.apply(v, X, train=False)))(variables)
  assert bf16_logits.dtype == jnp.float32
  scale = float(jnp.max(jnp.abs(f32_logits)))
  assert scale > 0.1
  np.testing.assert_allclose(bf16_logits, f32_logits, atol=0.03 * scale)


# ------------------------------------------------------------ interface ----


def test_weight_decay_mask_decays_only_kernels():
  params = _abstract_variables(NFResNet18(**TINY), X)['params']
  flat = _flat(weight_decay_mask(params))
  assert {path[-1] for path, decay in flat.items() if decay} == {'kernel'}
  assert {path[-1] for path, decay in flat.items() if not decay} == {'gain', 'bias'}
  assert sum(flat.values()) == 1 + 16 + 3 + 1  # stem, block convs, projections, head


def test_create_model_takes_the_trainers_kwargs(default_config):
  model = default_config.model
  assert model.drop_path_rate == 0.0
  kwargs = dict(num_classes=10, width=model.width, dropout_rate=model.dropout_rate,
                drop_path_rate=0.1, stem=model.stem, remat=False, dtype=jnp.bfloat16)
  nf = create_model('NF_ResNet50', norm='scaled_ws', **kwargs)
  assert isinstance(nf, NFResNet) and nf.drop_path_rate == 0.1 and nf.stage_sizes == (3, 4, 6, 3)
  assert create_model('nf_resnet26').norm == 'scaled_ws'
  assert {name for name in MODELS if name.startswith('nf_')} == {
      'nf_resnet18', 'nf_resnet34', 'nf_resnet26', 'nf_resnet50', 'nf_resnet101'}
  # The ResNet family has no stochastic depth: 0 is accepted and dropped.
  resnet = create_model('resnet50', norm=model.norm, **{**kwargs, 'drop_path_rate': 0.0})
  assert not hasattr(resnet, 'drop_path_rate')
  with pytest.raises(ValueError, match=r'drop_path_rate=0.1 needs an nf_\* model; resnet50 has '
                     r'no stochastic depth \(allowed: 0.0\)'):
    create_model('resnet50', norm=model.norm, **kwargs)


@pytest.mark.parametrize('kwargs,message', [
    ({'norm': 'batch'}, "norm='batch' is not one of: scaled_ws "
                        r'\(NF-ResNets normalize their weights'),
    ({'norm': 'weight'}, "norm='weight' is not one of: scaled_ws"),
    ({'drop_path_rate': 1.0}, r'drop_path_rate=1.0 must be in \[0, 1\)'),
    ({'drop_path_rate': -0.1}, r'drop_path_rate=-0.1 must be in \[0, 1\)'),
    ({'stem': 'cifar'}, "stem='cifar' is not one of: imagenet, small"),
    ({'width': 0}, 'width=0 must be a positive integer'),
    ({'dropout_rate': 1.0}, r'dropout_rate=1.0 must be in \[0, 1\)'),
])
def test_bad_arguments_raise(kwargs, message):
  with pytest.raises(ValueError, match=message):
    NFResNet50(**kwargs)
  with pytest.raises(ValueError, match=message):
    create_model('nf_resnet18', **kwargs)
