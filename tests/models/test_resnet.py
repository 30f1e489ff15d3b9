import functools
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bnfree_jax.models import (MODELS, NORMS, BasicBlock, BottleneckBlock, ResNet, ResNet18,
                               ResNet50, create_model, weight_decay_mask)

# Random-number code dominates XLA's CPU compile of these tiny nets: unsafe_rbg keys
# compile ~4x faster than threefry, and each model's init is compiled once for all tests.
KEY = functools.partial(jax.random.key, impl='unsafe_rbg')
TINY = dict(num_classes=10, width=8, stem='small', dropout_rate=0.1)
X = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)
LABELS = jnp.array([0, 3])


def _abstract_variables(model, x, train=False):
  return jax.eval_shape(functools.partial(model.init, train=train), KEY(0), x)


def _tiny(name, norm, **kwargs):
  return MODELS[name](norm=norm, **{**TINY, **kwargs})


@functools.cache
def _variables(name, norm):
  """Initial variables of the TINY model; dropout_rate and remat do not change them."""
  return jax.jit(functools.partial(_tiny(name, norm).init, train=False))(KEY(0), X)


def _step(model):
  """Train-mode loss, logits and grads and eval-mode logits, under two dropout keys.

  vmap over the keys keeps one copy of each pass in the program.
  """

  def run(variables, key):
    params = variables['params']
    state = {k: v for k, v in variables.items() if k != 'params'}
    keys = jax.random.split(key)

    def loss_fn(p, rng):
      logits, _ = model.apply({'params': p, **state}, X, train=True, rngs={'dropout': rng},
                              mutable=['batch_stats'])
      return optax.softmax_cross_entropy_with_integer_labels(logits, LABELS).mean(), logits

    (loss, train), grads = jax.vmap(jax.value_and_grad(loss_fn, has_aux=True),
                                    in_axes=(None, 0))(params, keys)
    eval_ = jax.vmap(lambda rng: model.apply(variables, X, train=False, rngs={'dropout': rng}))(
        keys)
    return dict(loss=loss, grads=grads, train=train, eval=eval_)

  return run


# resnet10: torchvision.models.resnet.ResNet(BasicBlock, [1, 1, 1, 1]), which
# torchvision does not name.
TORCHVISION_PARAMS = {'resnet10': 5_418_792, 'resnet18': 11_689_512, 'resnet34': 21_797_672,
                      'resnet50': 25_557_032, 'resnet101': 44_549_160, 'resnet152': 60_192_808}


@pytest.mark.parametrize('name', TORCHVISION_PARAMS)
def test_parameter_count_matches_torchvision(name):
  """Parameter counts do not depend on the image size: 32 px keeps tracing short."""
  x = jnp.zeros((1, 32, 32, 3))
  count = lambda variables: sum(p.size for p in jax.tree.leaves(variables['params']))
  bn = _abstract_variables(create_model(name, norm='batch'), x)
  assert count(bn) == TORCHVISION_PARAMS[name]
  assert set(bn) == {'params', 'batch_stats'}
  # Weight norm's g and bias replace BN's scale and bias one for one; without
  # any norm a conv keeps only a bias, one parameter per BN channel less.
  bn_channels = sum(p.size for path, p in flax.traverse_util.flatten_dict(bn['params']).items()
                    if path[-1] == 'scale')
  weight = _abstract_variables(create_model(name, norm='weight'), x)
  assert count(weight) == TORCHVISION_PARAMS[name]
  assert count(_abstract_variables(create_model(name, norm='none'), x)) == (
      TORCHVISION_PARAMS[name] - bn_channels)


@pytest.mark.parametrize('norm', NORMS)
def test_module_names_and_feature_map_shapes(norm):
  model = ResNet18(norm=norm, width=8)
  x = jnp.zeros((1, 224, 224, 3))
  params = _abstract_variables(model, x)['params']
  blocks = {f'stage{i}_block{j}' for i in range(1, 5) for j in range(2)}
  bn = norm in ('batch', 'group', 'group_ws')  # A norm layer after each conv.
  assert set(params) == blocks | {'stem_conv', 'head'} | ({'stem_norm'} if bn else set())
  conv_params = {'batch': {'kernel'}, 'weight': {'v', 'g', 'bias'}, 'none': {'kernel', 'bias'},
                 'group': {'kernel'}, 'group_ws': {'kernel'}}
  block = params['stage2_block0']
  expected = {'conv1', 'conv2', 'proj_conv'} | ({'norm1', 'norm2', 'proj_norm'} if bn else set())
  assert set(block) == expected
  assert set(block['conv1']) == conv_params[norm]
  assert 'proj_conv' not in params['stage1_block0'] and 'proj_conv' not in params['stage2_block1']

  _, state = jax.eval_shape(lambda: model.apply(
      model.init(KEY(0), x, train=False), x, train=False, capture_intermediates=True,
      mutable=['intermediates']))
  shapes = {k: v['__call__'][0].shape for k, v in state['intermediates'].items() if k in blocks}
  assert shapes['stage1_block1'] == (1, 56, 56, 8)
  assert shapes['stage2_block0'] == (1, 28, 28, 16)
  assert shapes['stage4_block1'] == (1, 7, 7, 64)


def test_the_strided_small_stem_is_the_small_stem_at_every_other_pixel():
  """stem='small_s2' is 'small' at stride 2: with the same parameters its
  stem conv gives every other row and column of the stride-1 one, and a
  28 px image reaches the stages at 14, 7, 4 and 2 px."""
  x = jnp.asarray(np.random.default_rng(3).normal(size=(1, 28, 28, 3)), jnp.float32)
  variables = _variables('resnet10', 'group')

  def features(stem):
    _, state = _tiny('resnet10', 'group', stem=stem).apply(
        variables, x, train=False, capture_intermediates=True, mutable=['intermediates'])
    return {k: v['__call__'][0] for k, v in state['intermediates'].items() if k != '__call__'}

  small, strided = features('small'), features('small_s2')
  np.testing.assert_allclose(strided['stem_conv'], small['stem_conv'][:, ::2, ::2], atol=1e-5)
  assert [strided[f'stage{i}_block0'].shape[1] for i in range(1, 5)] == [14, 7, 4, 2]
  assert [small[f'stage{i}_block0'].shape[1] for i in range(1, 5)] == [28, 14, 7, 4]


def test_bottleneck_uses_stride_on_3x3_and_expands_by_4():
  model = ResNet50(norm='batch', width=8)
  x = jnp.zeros((1, 64, 64, 3))
  params = _abstract_variables(model, x)['params']
  block = params['stage2_block0']
  assert block['conv1']['kernel'].shape == (1, 1, 32, 16)
  assert block['conv2']['kernel'].shape == (3, 3, 16, 16)
  assert block['conv3']['kernel'].shape == (1, 1, 16, 64)
  assert block['proj_conv']['kernel'].shape == (1, 1, 32, 64)
  assert params['stage1_block0']['proj_conv']['kernel'].shape == (1, 1, 8, 32)

  # The kernels are the same in v1 and v1.5; where the stride sits shows in the
  # feature maps: the 1x1 reduction keeps the stage's 16x16 input (v1 would
  # halve it there), the 3x3 halves it, and the expansion quadruples the width.
  _, state = jax.eval_shape(lambda: model.apply(
      model.init(KEY(0), x, train=False), x, train=False, mutable=['intermediates'],
      capture_intermediates=lambda mdl, method: method == '__call__'))
  shapes = {path[:-1]: out[0].shape for path, out in
            flax.traverse_util.flatten_dict(state['intermediates']).items()}
  assert shapes[('stage1_block2',)] == (1, 16, 16, 32)
  assert shapes[('stage2_block0', 'conv1')] == (1, 16, 16, 16)
  assert shapes[('stage2_block0', 'conv2')] == (1, 8, 8, 16)
  assert shapes[('stage2_block0', 'conv3')] == (1, 8, 8, 64)
  assert shapes[('stage2_block0', 'proj_conv')] == (1, 8, 8, 64)
  # Inside a stage no block strides: its 3x3 keeps the size.
  assert shapes[('stage2_block1', 'conv2')] == (1, 8, 8, 16)
  assert shapes[('stage4_block2',)] == (1, 2, 2, 256)


def _check_step(out, params):
  """Shapes and dtypes; every output has a leading axis over the two dropout keys."""
  for key in ('train', 'eval'):
    assert out[key].shape == (2, 2, 10) and out[key].dtype == jnp.float32
  assert out['loss'].shape == (2,)
  assert jax.tree.structure(out['grads']) == jax.tree.structure(params)
  for g, p in zip(jax.tree.leaves(out['grads']), jax.tree.leaves(params)):
    assert g.shape == (2, *p.shape) and g.dtype == jnp.float32


# Compiled and run: ResNet-18 under every norm (bottleneck blocks run in the remat test).
# The deeper nets only repeat the same blocks, and compiling them would cost minutes of
# CPU, so they are traced (shapes and dtypes); ResNet-101/152, the slowest to trace,
# under the paper's norm only. 'group_ws' is 'group' with another conv layer, whose
# forward pass and gradients test_matches_a_lax_reference pins: not compiled again here.
REAL = [('resnet18', norm) for norm in NORMS if norm != 'group_ws']
TRACED = ([(name, norm) for name in ('resnet34', 'resnet50') for norm in NORMS]
          + [('resnet101', 'weight'), ('resnet152', 'weight')])


@pytest.mark.parametrize('name,norm', REAL)
def test_forward_backward(name, norm):
  variables = _variables(name, norm)
  out = jax.jit(_step(_tiny(name, norm)))(variables, KEY(1))
  _check_step(out, variables['params'])
  assert np.all(np.isfinite(out['loss'])) and np.all(out['loss'] > 0)
  for key in ('train', 'eval'):
    assert np.all(np.isfinite(out[key])), key
  grads = jax.tree.leaves(out['grads'])
  assert all(np.all(np.isfinite(g)) for g in grads)
  assert sum(float(jnp.sum(g**2)) for g in grads) > 0
  # Eval ignores the dropout key; train mode drops different units under each key.
  np.testing.assert_array_equal(out['eval'][0], out['eval'][1])
  assert not np.allclose(out['train'][0], out['eval'][0], atol=1e-4)
  assert not np.allclose(out['train'][0], out['train'][1], atol=1e-4)


def _at(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _reference(variables, x, norm, train):
  """The net of test_matches_a_lax_reference written out with lax:
  (logits, {BN layer path: (batch mean, biased batch variance)})."""
  params, seen = variables['params'], {}

  def conv(path, x, stride):
    q = _at(params, path)
    kernel = (q['v'] * q['g'] / jnp.sqrt(jnp.sum(q['v']**2, axis=(0, 1, 2)))
              if norm == 'weight' else q['kernel'])
    if norm == 'group_ws':  # Standardized per output channel over the fan-in, He-scaled.
      w = kernel.reshape(-1, kernel.shape[-1])
      kernel = (kernel - w.mean(0)) / jnp.sqrt(w.var(0) + 1e-5) / math.sqrt(w.shape[0])
    pad = kernel.shape[0] // 2
    y = jax.lax.conv_general_dilated(x, kernel, (stride, stride), [(pad, pad)] * 2,
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return y if norm in ('batch', 'group', 'group_ws') else y + q['bias']

  def bn(path, y):
    if norm in ('group', 'group_ws'):  # Per example, over gcd(16, width) groups of channels.
      groups = math.gcd(16, params['stem_conv']['kernel'].shape[-1])
      g = y.reshape(*y.shape[:3], groups, -1)
      mean, var = g.mean((1, 2, 4), keepdims=True), g.var((1, 2, 4), keepdims=True)
      y = ((g - mean) / jnp.sqrt(var + 1e-5)).reshape(y.shape)
      q = _at(params, path)
      return y * q['scale'] + q['bias']
    if norm != 'batch':
      return y
    if train:
      mean, var = y.mean((0, 1, 2)), y.var((0, 1, 2))
      seen[path] = mean, var
    else:
      running = _at(variables['batch_stats'], path)
      mean, var = running['mean'], running['var']
    q = _at(params, path)
    return (y - mean) / jnp.sqrt(var + 1e-5) * q['scale'] + q['bias']

  h = jax.nn.relu(bn(('stem_norm',), conv(('stem_conv',), x, 1)))
  for block, stride in (('stage1_block0', 1), ('stage2_block0', 2)):
    y = jax.nn.relu(bn((block, 'norm1'), conv((block, 'conv1'), h, stride)))
    y = bn((block, 'norm2'), conv((block, 'conv2'), y, 1))
    shortcut = (h if stride == 1 else
                bn((block, 'proj_norm'), conv((block, 'proj_conv'), h, stride)))
    h = jax.nn.relu(y + shortcut)
  return h.mean((1, 2)) @ params['head']['kernel'] + params['head']['bias'], seen


@pytest.mark.parametrize('norm', NORMS)
def test_matches_a_lax_reference(norm):
  """A block per stage, two stages (so a strided, projecting block): logits,
  BN's running statistics and gradients equal a hand-written lax forward pass,
  and the gradient of every parameter tensor agrees with central differences."""
  model = ResNet(stage_sizes=(1, 1), block_cls=BasicBlock, norm=norm, num_classes=3, width=4,
                 stem='small')
  x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 6, 6, 3)), jnp.float32)
  labels = jnp.array([0, 2, 1, 2])
  rng = np.random.default_rng(2)
  # Away from init (g = |v|, zero biases, unit BN scales), so that every
  # parameter counts; BN's running variances stay positive.
  variables = jax.tree.map(
      lambda a: (np.abs(a) * rng.uniform(0.5, 1.5, a.shape)
                 + 0.2 * rng.normal(size=a.shape)).astype(np.float32),
      jax.device_get(jax.jit(functools.partial(model.init, train=False))(KEY(0), x)))
  state = {k: v for k, v in variables.items() if k != 'params'}
  if norm == 'batch':
    state['batch_stats'] = jax.tree.map(np.abs, state['batch_stats'])
  ce = lambda logits: optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  def model_loss(params):
    logits, updated = model.apply({'params': params, **state}, x, train=True,
                                  mutable=['batch_stats'])
    return ce(logits), (logits, updated)

  def reference_loss(params):
    logits, seen = _reference({'params': params, **state}, x, norm, train=True)
    return ce(logits), (logits, seen)

  @jax.jit
  def run(params):
    (_, (logits, updated)), grads = jax.value_and_grad(model_loss, has_aux=True)(params)
    (_, (want_logits, seen)), want_grads = jax.value_and_grad(reference_loss, has_aux=True)(
        params)
    eval_logits = model.apply({'params': params, **state}, x, train=False)
    want_eval = _reference({'params': params, **state}, x, norm, train=False)[0]
    return (logits, want_logits), (eval_logits, want_eval), (grads, want_grads), updated, seen

  params = variables['params']
  train, eval_, (grads, want_grads), updated, seen = run(params)
  np.testing.assert_allclose(*train, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(*eval_, rtol=1e-5, atol=1e-6)
  # Without BN and dropout, training and eval mode compute the same function.
  assert np.allclose(train[0], eval_[0], atol=1e-5) == (norm != 'batch')
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               grads, want_grads)
  # flax's momentum 0.9 keeps 0.9 of the running value (torchvision's 0.1).
  assert set(seen) == {p[:-1] for p in flax.traverse_util.flatten_dict(
      state.get('batch_stats', {})) if p[-1] == 'mean'}
  for path, (mean, var) in seen.items():
    old = _at(state['batch_stats'], path)
    new = _at(updated['batch_stats'], path)
    np.testing.assert_allclose(new['mean'], 0.9 * old['mean'] + 0.1 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new['var'], 0.9 * old['var'] + 0.1 * var, rtol=1e-5, atol=1e-6)

  # Along each parameter tensor's own gradient, the slope is that gradient's
  # norm. Central differences in float64: in float32 their rounding noise
  # (the loss's size times ~1e-7, over eps) reached 1e-2 on an AMD host.
  flat = {p: np.asarray(g) for p, g in flax.traverse_util.flatten_dict(grads).items()}
  norms = np.array([np.linalg.norm(g) for g in flat.values()])
  assert norms.min() > 1e-3 and norms.max() > 0.1
  directions = flax.traverse_util.unflatten_dict({p: np.stack(
      [g / n if q == p else np.zeros_like(g) for q, n in zip(flat, norms)])
      for p, g in flat.items()})
  eps = 1e-3
  with jax.enable_x64(True):
    model64, as64 = model.clone(dtype=jnp.float64), lambda t: jax.tree.map(np.float64, t)
    x64, state64 = as64(x), as64(state)

    @jax.jit
    def slopes(params, directions):
      def loss(d, sign):
        shifted = jax.tree.map(lambda p, e: p + sign * eps * e, params, d)
        return ce(model64.apply({'params': shifted, **state64}, x64, train=True,
                                mutable=['batch_stats'])[0])
      return jax.vmap(lambda d: (loss(d, 1.0) - loss(d, -1.0)) / (2 * eps))(directions)

    got = slopes(as64(params), as64(directions))
    assert got.dtype == np.float64
  np.testing.assert_allclose(got, norms, rtol=0.02, atol=1e-3)


@pytest.mark.parametrize('name,norm', TRACED)
def test_forward_backward_traced(name, norm):
  model = _tiny(name, norm)
  variables = _abstract_variables(model, X)
  _check_step(jax.eval_shape(_step(model), variables, KEY(1)), variables['params'])


def test_without_dropout_train_equals_eval():
  model = _tiny('resnet18', 'weight', dropout_rate=0.0)
  run = jax.jit(lambda v: (model.apply(v, X, train=True), model.apply(v, X, train=False)))
  train, eval_ = run(_variables('resnet18', 'weight'))
  np.testing.assert_allclose(train, eval_, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('norm', ['batch', 'weight'])
def test_remat_changes_nothing_but_memory(norm):
  # With dropout (and BN's mutable state) flowing through the checkpoint; two bottleneck
  # blocks, one projecting, keep the compile short.
  model = ResNet(stage_sizes=(1, 1), block_cls=BottleneckBlock, norm=norm, **TINY)
  remat = model.clone(remat=True)
  assert (jax.tree.structure(_abstract_variables(model, X, train=True))
          == jax.tree.structure(_abstract_variables(remat, X, train=True)))

  @jax.jit
  def run(variables, key):

    def loss(m, params):
      logits, updates = m.apply({**variables, 'params': params}, X, train=True,
                                rngs={'dropout': key}, mutable=['batch_stats'])
      return optax.softmax_cross_entropy_with_integer_labels(logits, LABELS).mean(), updates

    return [jax.value_and_grad(functools.partial(loss, m), has_aux=True)(variables['params'])
            for m in (model, remat)]

  plain, rematted = run(jax.jit(functools.partial(model.init, train=False))(KEY(0), X), KEY(1))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               plain, rematted)
  (loss, updates), grads = plain
  assert np.isfinite(loss) and all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert bool(jax.tree.leaves(updates)) == (norm == 'batch')  # running statistics updated


@pytest.mark.parametrize('norm', NORMS)
def test_weight_decay_mask_selects_kernels(norm):
  params = _abstract_variables(ResNet18(**TINY, norm=norm), jnp.zeros((1, 16, 16, 3)))['params']
  mask = weight_decay_mask(params)
  assert jax.tree.structure(mask) == jax.tree.structure(params)
  flat = flax.traverse_util.flatten_dict(mask)
  shapes = flax.traverse_util.flatten_dict(params)
  for path, decay in flat.items():
    # Kernels are the only multi-dimensional params; g, biases and BN scale/bias are vectors.
    assert decay == (shapes[path].ndim > 1), path
  assert sum(flat.values()) == 1 + 16 + 3 + 1  # stem, block convs, projections, head
  assert flat[('head', 'kernel')] and not flat[('head', 'bias')]


def _equations(jaxpr):
  """Every equation of a jaxpr and of the jaxprs nested in it (jit, remat)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if hasattr(sub, 'eqns') or hasattr(sub, 'jaxpr'):
          yield from _equations(getattr(sub, 'jaxpr', sub))


def test_bfloat16_compute_keeps_float32_params_and_logits():
  model = _tiny('resnet18', 'weight', dtype=jnp.bfloat16)
  variables = _abstract_variables(model, X)
  assert {p.dtype for p in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  # The same float32 variables, run in both precisions.
  variables = _variables('resnet18', 'weight')
  forward = lambda model: lambda v: model.apply(v, X, train=False)
  jaxpr = jax.make_jaxpr(forward(model))(variables).jaxpr
  convs = [e for e in _equations(jaxpr) if e.primitive.name == 'conv_general_dilated']
  dots = [e for e in _equations(jaxpr) if e.primitive.name == 'dot_general']
  # Stem, two per block, three projections (dots on CPU: layers.conv), the head.
  assert len(convs) + len(dots) == 1 + 2 * 8 + 3 + 1
  for eqn in convs + dots:
    assert [v.aval.dtype for v in (*eqn.invars, *eqn.outvars)] == [jnp.bfloat16] * 3, eqn
  float32 = _tiny('resnet18', 'weight')
  logits, reference = jax.jit(lambda v: (forward(model)(v), forward(float32)(v)))(variables)
  assert logits.dtype == jnp.float32 and logits.shape == (2, 10)
  # bfloat16 values cast up, off the float32 logits (|logits| < 2) by bf16
  # rounding along the way: 0.009 here.
  np.testing.assert_array_equal(logits, logits.astype(jnp.bfloat16).astype(jnp.float32))
  assert not np.array_equal(logits, reference)
  np.testing.assert_allclose(logits, reference, rtol=0, atol=0.03)


@pytest.mark.parametrize('kwargs,message', [
    ({'norm': 'foo'}, "norm='foo' is not one of: batch, weight, none"),
    ({'stem': 'cifar'}, "stem='cifar' is not one of: imagenet, small"),
    ({'width': 0}, 'width=0 must be a positive integer'),
    ({'width': -8}, 'width=-8 must be a positive integer'),
    ({'dropout_rate': 1.0}, r'dropout_rate=1.0 must be in \[0, 1\)'),
    ({'dropout_rate': -0.1}, r'dropout_rate=-0.1 must be in \[0, 1\)'),
])
def test_bad_arguments_raise(kwargs, message):
  with pytest.raises(ValueError, match=message):
    ResNet18(**kwargs)
  with pytest.raises(ValueError, match=message):
    create_model('resnet50', **kwargs)


def test_create_model_by_name():
  for name in ('resnet18', 'ResNet18', 'RESNET18'):
    model = create_model(name, num_classes=5)
    assert isinstance(model, ResNet) and model.stage_sizes == (2, 2, 2, 2)
  assert create_model('ResNet152').stage_sizes == (3, 8, 36, 3)
  assert create_model('resnet101').block_cls is BottleneckBlock
  assert {name for name in MODELS if name.startswith('resnet')} == {
      'resnet10', 'resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152'}
  assert create_model('resnet10').stage_sizes == (1, 1, 1, 1)
  with pytest.raises(ValueError, match="'resnet19' is not one of: resnet10, resnet18, resnet34"):
    create_model('resnet19')


def test_per_device_batch_statistics_equal_a_loop_over_the_shards():
  """bn_groups=2 (model.bn_stats='per_device' on 2 devices): each half of the
  batch is normalized with its own statistics, as if run alone."""
  x = jax.random.normal(KEY(3), (4, 16, 16, 3))
  grouped = _tiny('resnet18', 'batch', bn_groups=2, dropout_rate=0.0)
  plain = _tiny('resnet18', 'batch', dropout_rate=0.0)
  variables = plain.init(KEY(0), x, train=False)
  apply = lambda model, v, x: model.apply(v, x, train=True, rngs={'dropout': KEY(1)},
                                          mutable=['batch_stats'])
  logits, updated = apply(grouped, variables, x)
  halves = [apply(plain, variables, half) for half in (x[:2], x[2:])]
  np.testing.assert_allclose(logits, jnp.concatenate([h[0] for h in halves]), atol=2e-5)
  # Running statistics move by the mean of the two halves' statistics.
  mean = lambda u: u['batch_stats']['stem_norm']['mean']
  np.testing.assert_allclose(mean(updated), (mean(halves[0][1]) + mean(halves[1][1])) / 2,
                             atol=1e-6)


def test_head_dropout_rate_is_apart_from_the_branch_dropout():
  x = jax.random.normal(KEY(3), (4, 16, 16, 3))
  variables = _tiny('resnet18', 'weight').init(KEY(0), x, train=False)
  run = lambda **rates: _tiny('resnet18', 'weight', **rates).apply(
      variables, x, train=True, rngs={'dropout': KEY(1)})
  eval_logits = _tiny('resnet18', 'weight').apply(variables, x, train=False)
  # Branch dropout off and head dropout off: training logits equal eval's.
  np.testing.assert_allclose(run(dropout_rate=0.0, head_dropout_rate=0.0), eval_logits,
                             atol=1e-5)
  assert not np.allclose(run(dropout_rate=0.0, head_dropout_rate=0.5), eval_logits, atol=1e-3)
  assert not np.allclose(run(dropout_rate=0.3, head_dropout_rate=0.0), eval_logits, atol=1e-3)
  with pytest.raises(ValueError, match=r'head_dropout_rate=1.0 must be in \[0, 1\)'):
    _tiny('resnet18', 'weight', head_dropout_rate=1.0)


def test_group_norm_keeps_examples_apart():
  """An example's logits and its gradient are the same alone or beside
  another one: what per-example gradients (DP-SGD) need, and BN breaks."""
  for norm in ('group', 'batch'):
    model = _tiny('resnet18', norm, dropout_rate=0.0)
    variables = _variables('resnet18', norm)

    @jax.jit
    def grads(x):
      def loss(params):
        logits, _ = model.apply({**variables, 'params': params}, x, train=True,
                                mutable=['batch_stats'])
        return logits[0].sum()
      return jax.grad(loss)(variables['params'])
    alone, together = grads(X[:1]), grads(X)
    # Equal to float32 rounding (relative to each array's largest entry);
    # under BN, off by the order of the entries themselves.
    same = all(np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
               for a, b in zip(jax.tree.leaves(alone), jax.tree.leaves(together)))
    assert same == (norm == 'group'), norm
  params = _variables('resnet18', 'group')['params']
  assert params['stage1_block0']['norm1']['scale'].shape == (8,)
  # gcd(16, 12) = 4 groups, dividing every layer's 12 * 2^i channels.
  model = ResNet18(num_classes=10, width=12, stem='small', norm='group')
  variables = jax.eval_shape(functools.partial(model.init, train=False), KEY(0), X)
  assert jax.eval_shape(functools.partial(model.apply, train=False), variables, X).shape == (2, 10)
