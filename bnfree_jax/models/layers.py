"""Weight-normalized (Salimans & Kingma 2016) and scaled weight-standardized
(Brock et al. 2021) convolutions, the former's data-dependent init, a cheaper
dropout, stochastic depth, batch norm with per-device statistics, and a
convolution and a max pool whose gradients are cheap on CPU."""

import contextlib
import contextvars
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

# torchvision's kaiming_normal_(mode='fan_out', nonlinearity='relu'), untruncated.
HE_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')

PER_EXAMPLE_FILTER_GRAD = 'per_example_filter_grad'
_PER_EXAMPLE = contextvars.ContextVar(PER_EXAMPLE_FILTER_GRAD, default=False)

# Keeps 1/sigma finite for a channel that is constant on the init batch.
_DDI_EPS = 1e-6


def conv(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
         padding: str | Sequence[tuple[int, int]]) -> jax.Array:
  """lax.conv_general_dilated of NHWC x and an HWIO kernel.

  Two CPU paths:
  - a 1x1 convolution without padding is a strided slice and a dot: XLA:CPU
    computes a convolution's filter gradient after transposing both
    activations, and for 1x1 kernels that made it 2-9x slower than the dot's
    (results/bench/cpu_gap.md); forward and input gradient are no slower;
  - inside per_example_gradients(), any other convolution's filter gradient
    under jax.vmap is _per_example_filter_grad.
  """
  strides = tuple(strides)
  unpadded = isinstance(padding, str) or all(tuple(p) == (0, 0) for p in padding)
  cpu = jax.default_backend() == 'cpu'
  if cpu and kernel.shape[:2] == (1, 1) and unpadded:
    # Without padding a 1x1 window sees the pixels s * o: 'SAME' pads none either.
    x = x[:, ::strides[0], ::strides[1]]
    return lax.dot_general(x, kernel[0, 0], (((3,), (0,)), ((), ())))
  if cpu and _PER_EXAMPLE.get():
    pads = (tuple(lax.padtype_to_pads(x.shape[1:3], kernel.shape[:2], strides, padding))
            if isinstance(padding, str) else tuple(tuple(p) for p in padding))
    return _conv_vmap_filter_grad(x, kernel, strides, pads)
  return _lax_conv(x, kernel, strides, padding)


@contextlib.contextmanager
def per_example_gradients():
  """Models traced inside compute, on CPU, their convolutions' per-example
  filter gradients (under jax.vmap) as _per_example_filter_grad, through a
  custom VJP: DP-SGD's per-example gradients are traced inside. Outside,
  conv() is XLA's own and takes every transformation (forward mode and
  higher orders too, which the custom VJP does not)."""
  token = _PER_EXAMPLE.set(True)
  try:
    yield
  finally:
    _PER_EXAMPLE.reset(token)


def _lax_conv(x, kernel, strides, padding):
  return lax.conv_general_dilated(x, kernel, strides, padding,
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_vmap_filter_grad(x, kernel, strides, pads):
  """_lax_conv, whose filter gradient under jax.vmap is _per_example_filter_grad."""
  return _lax_conv(x, kernel, strides, pads)


def _conv_vmap_filter_grad_fwd(x, kernel, strides, pads):
  return _lax_conv(x, kernel, strides, pads), (x, kernel)


def _conv_vmap_filter_grad_bwd(strides, pads, residuals, g):
  x, kernel = residuals
  # vjp, not linear_transpose: the latter drops shard_map's varying-axis types.
  dx, = jax.vjp(lambda x: _lax_conv(x, kernel, strides, pads), x)[1](g)

  @jax.custom_batching.custom_vmap
  def filter_grad(x, g):
    return jax.vjp(lambda k: _lax_conv(x, k, strides, pads), kernel)[1](g)[0]

  @filter_grad.def_vmap
  def _(axis_size, in_batched, x, g):
    x, g = (v if batched else jnp.broadcast_to(v, (axis_size, *v.shape))
            for v, batched in zip((x, g), in_batched))
    return _per_example_filter_grad(x, g, kernel.shape[:2], strides, pads), True
  return dx, filter_grad(x, g)


_conv_vmap_filter_grad.defvjp(_conv_vmap_filter_grad_fwd, _conv_vmap_filter_grad_bwd)


def _per_example_filter_grad(x: jax.Array, g: jax.Array, window: tuple[int, int],
                             strides: tuple[int, int], pads) -> jax.Array:
  """The filter gradients [B, kh, kw, C, O] of the examples x [B, N, H, W, C]
  with output gradients g [B, N, Ho, Wo, O] (N images each, summed): one
  batched dot of g and the kh * kw strided slices of the padded x that each
  filter tap sees. XLA's own batching makes it a convolution grouped by
  example, which XLA:CPU runs slowly: with it the DP-SGD step of a ResNet-18
  at 224 px took 2.02x its plain step, with this 1.40x (docs/privacy.md#speed)."""
  (kh, kw), (sh, sw), (ho, wo) = window, strides, g.shape[2:4]
  with jax.named_scope(PER_EXAMPLE_FILTER_GRAD):  # Named for scripts/xla_cpu_profile.py.
    # Channels before pixels, so that the taps (kh * kw copies of x) are
    # written without a transpose and the dot contracts the minor axes.
    x = lax.pad(jnp.moveaxis(x, -1, 2), jnp.zeros((), x.dtype),
                [(0, 0, 0)] * 3 + [(lo, hi, 0) for lo, hi in pads])
    taps = jnp.stack([jnp.stack([x[..., i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw]
                                 for j in range(kw)], axis=1) for i in range(kh)], axis=1)
    # Summed in float32 under bfloat16 compute too, whatever the dot's default.
    return jnp.einsum('bijnchw,bnohw->bijco', taps, jnp.moveaxis(g, -1, 2),
                      preferred_element_type=jnp.float32).astype(g.dtype)


def _conv_bias(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, strides: Sequence[int],
               padding: str | Sequence[tuple[int, int]], dtype: Any) -> jax.Array:
  """conv() plus bias (None: none), in dtype as flax's nn.Conv computes."""
  x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=dtype)
  y = conv(x, kernel, strides, padding)
  return y if bias is None else y + bias


class _Conv2D(nn.Module):
  """The fields every 2-D NHWC convolution here shares with nn.Conv; the
  kernel is HWIO, as nn.Conv's."""

  features: int
  kernel_size: Sequence[int]
  strides: Sequence[int] = (1, 1)
  padding: str | Sequence[tuple[int, int]] = 'SAME'
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()  # nn.Conv's.
  bias_init: Callable = nn.initializers.zeros

  @nn.nowrap
  def kernel_shape(self, x: jax.Array) -> tuple[int, ...]:
    return (*self.kernel_size, x.shape[-1], self.features)

  @nn.nowrap
  def bias_param(self) -> jax.Array | None:
    """The (features,) bias, declared in the caller's compact scope; None without."""
    return (self.param('bias', self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)


class Conv(_Conv2D):
  """nn.Conv's 2-D NHWC case (the same parameters, the same output) through
  conv(), so cheaper to train on CPU."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', self.kernel_init, self.kernel_shape(x), self.param_dtype)
    bias = self.bias_param()
    return _conv_bias(x, kernel, bias, self.strides, self.padding, self.dtype)


def _channel_norm(v: jax.Array) -> jax.Array:
  """||v|| per output channel of an HWIO kernel."""
  return jnp.sqrt(jnp.sum(jnp.square(v), axis=(0, 1, 2)))


class WNConv(_Conv2D):
  """2-D convolution whose kernel is g * v / ||v||, the norm per output channel.

  g starts at ||v||, as in PyTorch's weight_norm, so the initial kernel is v
  itself (flax's nn.WeightNorm would start every filter at unit norm instead).
  """

  kernel_init: Callable = HE_INIT

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    v = self.param('v', self.kernel_init, self.kernel_shape(x), self.param_dtype)
    g = self.param('g', lambda _: _channel_norm(v))
    bias = self.bias_param()
    return self.conv(x, v * (g / _channel_norm(v)), bias)

  @nn.nowrap
  def conv(self, x: jax.Array, kernel: jax.Array, bias: jax.Array | None) -> jax.Array:
    return _conv_bias(x, kernel, bias, self.strides, self.padding, self.dtype)


# The ReLU's gamma of Brock et al. 2021 (timm's _nonlin_gamma['relu']):
# 1 / std(relu(z)) for z ~ N(0, 1).
RELU_GAMMA = 1.7139588594436646


class WSConv(_Conv2D):
  """2-D convolution with scaled weight standardization, as timm's ScaledStdConv2d.

  kernel = gain * gamma * (w - mean) / sqrt(var + eps) / sqrt(fan_in), mean and
  biased var per output channel over the fan-in (kh, kw, in). Standardized in
  float32 from the params, in eval mode too. eps is timm's NF-net std_conv_eps
  (1e-5), not ScaledStdConv2d's own 1e-6 default.
  """

  gamma: float = 1.0
  eps: float = 1e-5
  gain_init: float = 1.0
  # False: no gain (1), for a conv that a GroupNorm follows, whose scale is the gain.
  use_gain: bool = True
  # timm's kaiming_normal_(mode='fan_in', nonlinearity='linear'): N(0, 1 / fan_in).
  kernel_init: Callable = nn.initializers.variance_scaling(1.0, 'fan_in', 'normal')

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    w = self.param('kernel', self.kernel_init, self.kernel_shape(x), self.param_dtype)
    gain = (self.param('gain', nn.initializers.constant(self.gain_init), (self.features,),
                       self.param_dtype) if self.use_gain else 1.0)
    bias = self.bias_param()
    fan_in = w.shape[0] * w.shape[1] * w.shape[2]
    mean = jnp.mean(w, axis=(0, 1, 2))
    var = jnp.var(w, axis=(0, 1, 2))
    kernel = (w - mean) * (lax.rsqrt(var + self.eps) * gain * (self.gamma * fan_in**-0.5))
    return _conv_bias(x, kernel, bias, self.strides, self.padding, self.dtype)


class _InvertedDropout(nn.Module):
  """Zeroes the entries of x that kept() leaves out, with probability `rate`,
  and scales the others by 1 / (1 - rate); identity when deterministic."""

  rate: float
  deterministic: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    return lax.select(jnp.broadcast_to(self.kept(x, keep), x.shape),
                      x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))

  @nn.nowrap
  def kept(self, x: jax.Array, keep: float) -> jax.Array:
    """A boolean mask that broadcasts to x, True with probability keep."""
    raise NotImplementedError


class Dropout(_InvertedDropout):
  """nn.Dropout with a mask from 16-bit uniforms, two per 32-bit random draw.

  flax draws 32 random bits per element, and on XLA:CPU that mask costs
  about as much as all the weight normalization in a ResNet-18 step (bench:
  results/bench/investigation.md). Here one threefry draw serves two
  elements; an element is kept when its 16-bit uniform is below
  round(keep * 2^16) (compared as <= that - 1, which fits in 16 bits), so
  the keep probability is exact to 2^-17. The draw is jax.random.bits, whose
  partitionable threefry gives every element the same bits however the batch
  is sharded.
  """

  @nn.nowrap
  def kept(self, x: jax.Array, keep: float) -> jax.Array:
    *lead, channels = x.shape
    pairs = jax.random.bits(self.make_rng('dropout'), (*lead, (channels + 1) // 2), jnp.uint32)
    u16 = lax.bitcast_convert_type(pairs, jnp.uint16).reshape(*lead, -1)[..., :channels]
    return u16 <= jnp.uint16(round(keep * 65536) - 1)


def max_pool(x: jax.Array, window: tuple[int, int], strides: tuple[int, int],
             padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
  """nn.max_pool over NHWC x, -inf padding, with the same gradient; on CPU
  through cpu_max_pool, whose gradient XLA:CPU computes ~4x faster."""
  if jax.default_backend() == 'cpu':
    return cpu_max_pool(x, window, strides, padding)
  # XLA:GPU/TPU have a native select-and-scatter for the gradient.
  return nn.max_pool(x, window, strides=strides, padding=padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def cpu_max_pool(x, window, strides, padding):
  """nn.max_pool with a gradient written for XLA:CPU, bit for bit the same.

  XLA differentiates a max pool with select-and-scatter, which XLA:CPU
  expands into input-sized index arrays, an argmax and a scatter (the
  ResNet stem's 3x3/2 pool cost 10x PyTorch's: results/bench/cpu_gap.md).
  Here each window's gradient goes, as there, to its first maximum in
  row-major window order, -inf padding included, summed over overlapping
  windows in window order, but with elementwise selects and shifts only.
  """
  return nn.max_pool(x, window, strides=strides, padding=padding)


def _cpu_max_pool_fwd(x, window, strides, padding):
  y = nn.max_pool(x, window, strides=strides, padding=padding)
  return y, (x, y)


def _cpu_max_pool_bwd(window, strides, padding, residuals, g):
  x, y = residuals
  xp = jnp.pad(x, ((0, 0), *padding, (0, 0)), constant_values=-jnp.inf)
  n, hp, wp, c = xp.shape
  ho, wo = y.shape[1:3]
  zero = jnp.zeros((), g.dtype)
  firsts, taken = [], None
  for i in range(window[0]):
    for j in range(window[1]):
      at = lax.slice(xp, (0, i, j, 0),
                     (n, i + strides[0] * (ho - 1) + 1, j + strides[1] * (wo - 1) + 1, c),
                     (1, *strides, 1))
      hit = at == y
      # Select-and-scatter's tie rule: the first maximum in the window.
      firsts.append((i, j, hit if taken is None else hit & ~taken))
      taken = hit if taken is None else taken | hit
  # Offset (i, j) of window o reads padded row s * o + i = s * (o + i // s) + i % s
  # (s = strides[0]; columns alike). So the gradient is one block per
  # (row, column) residue, indexed by o + i // s, the blocks then interleaved.
  qh, qw = -(-hp // strides[0]), -(-wp // strides[1])
  blocks = {}
  # An input's windows, in window order, are its offsets in reverse: adding
  # the last offset first rounds the sums as select-and-scatter does.
  for i, j, first in reversed(firsts):
    si, sj = i // strides[0], j // strides[1]
    shifted = lax.pad(jnp.where(first, g, zero), zero,
                      ((0, 0, 0), (si, qh - ho - si, 0), (sj, qw - wo - sj, 0), (0, 0, 0)))
    residue = i % strides[0], j % strides[1]
    blocks[residue] = blocks[residue] + shifted if residue in blocks else shifted
  empty = jnp.zeros((n, qh, qw, c), g.dtype)
  rows = [jnp.stack([blocks.get((ri, rj), empty) for rj in range(strides[1])], axis=3)
          for ri in range(strides[0])]
  dxp = jnp.stack(rows, axis=2).reshape(n, qh * strides[0], qw * strides[1], c)
  (top, _), (left, _) = padding
  return (dxp[:, top:top + x.shape[1], left:left + x.shape[2]],)


cpu_max_pool.defvjp(_cpu_max_pool_fwd, _cpu_max_pool_bwd)


class GroupedBatchNorm(nn.Module):
  """nn.BatchNorm over the last axis whose training statistics are per group:
  the batch (B, ...) is split into num_groups consecutive slices of B / num_groups
  and each slice is normalized with its own mean and variance.

  With the batch sharded over num_groups devices (jit over a mesh), each
  device normalizes its own shard with its own statistics and no
  cross-device reduction enters the output: what PyTorch's DataParallel and
  DistributedDataParallel compute (without SyncBatchNorm), so what the paper's
  BN baseline saw. Variables have nn.BatchNorm's names and shapes (params
  scale, bias; batch_stats mean, var) and the same update, running =
  momentum * running + (1 - momentum) * batch statistic, with the biased
  variance; eval mode is nn.BatchNorm's.

  In DDP each replica keeps its own running statistics and rank 0's are saved.
  Here the running statistics are one replicated array, updated with the
  mean over groups of each group's statistics: every device's data counts,
  the result does not depend on which device comes first, and it estimates
  the same quantity as rank 0's with num_groups times less noise. That mean
  is one small all-reduce of (C,) values per layer, outside the forward pass.
  """

  num_groups: int
  use_running_average: bool = False
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = (x.shape[-1],)
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros(features, jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones(features, jnp.float32))
    scale = self.param('scale', nn.initializers.ones, features, self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, features, self.param_dtype)
    dtype = nn.dtypes.canonicalize_dtype(x, scale, bias, dtype=self.dtype)

    if self.use_running_average:
      mean, var, y = ra_mean.value, ra_var.value, x
    else:
      if x.shape[0] % self.num_groups:
        raise ValueError(f'GroupedBatchNorm: batch {x.shape[0]} is not divisible by '
                         f'num_groups={self.num_groups}')
      y = x.reshape(self.num_groups, -1, *x.shape[1:])
      # Statistics in at least float32, E[x^2] - E[x]^2, as nn.BatchNorm.
      xf = y.astype(jnp.promote_types(x.dtype, jnp.float32))
      axes = tuple(range(1, y.ndim - 1))
      mean = xf.mean(axes, keepdims=True)
      var = jnp.maximum(0.0, jnp.square(xf).mean(axes, keepdims=True) - jnp.square(mean))
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1 - m) * mean.reshape(-1, *features).mean(0)
        ra_var.value = m * ra_var.value + (1 - m) * var.reshape(-1, *features).mean(0)
    y = (y - mean) * (lax.rsqrt(var + self.epsilon) * scale) + bias
    return jnp.asarray(y.reshape(x.shape), dtype)


class DropPath(_InvertedDropout):
  """Stochastic depth as timm's DropPath: each example's input zeroed with
  probability `rate`, kept ones scaled by 1 / (1 - rate); the mask is drawn
  from the 'dropout' rng."""

  @nn.nowrap
  def kept(self, x: jax.Array, keep: float) -> jax.Array:
    return jax.random.bernoulli(self.make_rng('dropout'), keep,
                                (x.shape[0],) + (1,) * (x.ndim - 1))


def data_dependent_init(model: nn.Module, variables: Any, batch: jax.Array,
                        **apply_kwargs) -> Any:
  """Re-initialises every WNConv's g and bias from one batch (Salimans & Kingma, sec. 3).

  Layers are visited in forward order and each sees the output of the already
  re-initialised layers above it, so every WNConv output starts with zero mean
  and unit std per channel on `batch`. Runs in eval mode (train=False unless
  given) so that dropout and batch statistics stay out of it. Returns new
  variables; `variables` is left untouched. Works inside jax.jit too.
  """
  apply_kwargs.setdefault('train', False)
  if getattr(model, 'remat', False):
    # Values recorded inside a jax.checkpoint trace could not leave it.
    model = model.clone(remat=False)

  def run(variables, batch):
    updates = {}

    def interceptor(next_fun, args, kwargs, context):
      module = context.module
      if not isinstance(module, WNConv) or context.method_name != '__call__':
        return next_fun(*args, **kwargs)
      v = module.get_variable('params', 'v')
      t = module.conv(args[0], v / _channel_norm(v), None).astype(jnp.float32)
      mean = jnp.mean(t, axis=(0, 1, 2))
      inv_std = lax.rsqrt(jnp.var(t, axis=(0, 1, 2)) + _DDI_EPS)
      path = tuple(module.scope.path)
      updates[path + ('g',)] = inv_std
      if module.use_bias:
        updates[path + ('bias',)] = -mean * inv_std
        t = t - mean
      return (t * inv_std).astype(module.dtype or t.dtype)

    with nn.intercept_methods(interceptor):
      model.apply(variables, batch, **apply_kwargs)
    return updates

  updates = jax.jit(run)(variables, batch)
  if not updates:
    raise ValueError(f'{type(model).__name__} has no WNConv layer to initialise.')

  params = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables['params']))
  for key, value in updates.items():
    params[key] = value.astype(params[key].dtype)
  new_variables = dict(flax.core.unfreeze(variables))
  new_variables['params'] = flax.traverse_util.unflatten_dict(params)
  return new_variables


# torchvision's nn.Linear weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
TORCH_LINEAR_INIT = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')


def head(x: jax.Array, num_classes: int, dtype: Any,
         kernel_init: Callable = TORCH_LINEAR_INIT) -> jax.Array:
  """The classifier, a Dense layer named 'head' (call it inside a compact
  method): logits in at least float32, bfloat16 up and float64 kept."""
  x = nn.Dense(num_classes, dtype=dtype, name='head', kernel_init=kernel_init)(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def weight_decay_mask(params: Any) -> Any:
  """True for conv and dense kernels (`kernel`, WNConv's `v`); False for gains
  (WNConv's `g`, WSConv's `gain`), biases and BN affines, as NFNets decay only
  the weights."""
  return flax.traverse_util.path_aware_map(
      lambda path, _: path[-1] in ('kernel', 'v'), flax.core.unfreeze(params))
