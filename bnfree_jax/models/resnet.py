"""ResNet family (torchvision v1.5 layout) with batch-, weight-, group- or no
normalization.

norm='batch' is torchvision's ResNet exactly; norm='weight' is the paper's
modified block (Fig. 1b): every conv weight-normalized with a bias, no BN;
norm='group' puts GroupNorm where BN was (as Opacus's ModuleValidator does).
"""

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from bnfree_jax.models.layers import (HE_INIT, Conv, Dropout, GroupedBatchNorm, WNConv, WSConv,
                                     head, max_pool)
from bnfree_jax.models.scattering import scattering_input

# A flax layer constructor: functools.partial of a module class, called with name=.
ModuleDef = Any


def _group_norm(m) -> ModuleDef:
  return functools.partial(nn.GroupNorm, num_groups=math.gcd(m.gn_groups, m.width),
                           epsilon=1e-5, dtype=m.dtype)


# norm -> (conv, norm layer or None) for a ResNet `m` (its dtype, bn_groups,
# gn_groups) in train mode or not: a new kind is one entry here.
LAYERS = {
    # Under BN a conv bias is redundant (torchvision has none). torchvision's momentum
    # 0.1 weighs the new batch; flax's weighs the running mean. bn_groups > 1:
    # statistics per device (DDP's), else over the global batch (synchronized BN).
    'batch': lambda m, train: (
        functools.partial(Conv, use_bias=False, kernel_init=HE_INIT, dtype=m.dtype),
        functools.partial(GroupedBatchNorm, num_groups=m.bn_groups, use_running_average=not train,
                          momentum=0.9, epsilon=1e-5, dtype=m.dtype) if m.bn_groups > 1 else
        functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                          epsilon=1e-5, dtype=m.dtype)),
    'weight': lambda m, train: (
        functools.partial(WNConv, kernel_init=HE_INIT, dtype=m.dtype), None),
    'none': lambda m, train: (
        functools.partial(Conv, use_bias=True, kernel_init=HE_INIT, dtype=m.dtype), None),
    # Statistics per example (Wu & He 2018): no example sees another's, so
    # per-example gradients (DP-SGD) stay the examples' own. Every layer's
    # channel count is a multiple of the width, so gcd(gn_groups, width)
    # groups divide them all; torch's GroupNorm epsilon.
    'group': lambda m, train: (
        functools.partial(Conv, use_bias=False, kernel_init=HE_INIT, dtype=m.dtype),
        _group_norm(m)),
    # De et al. 2022's layer for DP-SGD: a weight-standardized conv, then GroupNorm.
    'group_ws': lambda m, train: (
        functools.partial(WSConv, use_bias=False, use_gain=False, dtype=m.dtype),
        _group_norm(m)),
}
NORMS = tuple(LAYERS)
# The norms whose GroupNorm layers take the ResNet's gn_groups.
GROUP_NORMS = ('group', 'group_ws')


class Stem(NamedTuple):
  kernel: int
  strides: int
  pool: bool  # A 3x3/2 max pool after the conv.
  scatter: bool = False  # The conv sees scattering_input(image), not the image.


# torchvision's stem; the CIFAR-style 3x3 for 28-32 px images; the same at
# stride 2, which halves the image first (a ResNet-10 of width 8 at 28 px:
# 0.58x the DP step's time); the 3x3 on the image's scattering coefficients,
# a fixed front end that quarters it (Tramer & Boneh 2021's prior for DP-SGD).
STEMS = {'imagenet': Stem(7, 2, True), 'small': Stem(3, 1, False),
         'small_s2': Stem(3, 2, False), 'scatter': Stem(3, 1, False, scatter=True)}


def stem_conv(conv: ModuleDef, features: int, stem: str, x: jax.Array) -> jax.Array:
  """The stem's conv (and the scattering before it), without norm or pool."""
  spec = STEMS[stem]
  x = scattering_input(x) if spec.scatter else x
  return square_conv(conv, features, spec.kernel, spec.strides, 'stem_conv')(x)


def _pad(kernel: int) -> tuple[tuple[int, int], tuple[int, int]]:
  # Symmetric torch-style padding; 'SAME' would pad (0, 1) on strided even inputs.
  return ((kernel // 2, kernel // 2),) * 2


def square_conv(conv: ModuleDef, features: int, kernel: int, strides: int,
                name: str) -> nn.Module:
  """conv with a kernel x kernel window, square strides and torch-style padding."""
  return conv(features=features, kernel_size=(kernel, kernel), strides=(strides, strides),
              padding=_pad(kernel), name=name)


def check_arguments(stem: str, width: int, dropout_rate: float) -> None:
  """ValueError for a stem, width or dropout_rate that no model takes."""
  if stem not in STEMS:
    raise ValueError(f'stem={stem!r} is not one of: {", ".join(STEMS)}')
  if not (isinstance(width, int) and width > 0):
    raise ValueError(f'width={width!r} must be a positive integer')
  if not 0 <= dropout_rate < 1:
    raise ValueError(f'dropout_rate={dropout_rate!r} must be in [0, 1)')


class _Block(nn.Module):
  features: int
  conv: ModuleDef
  norm: ModuleDef | None
  strides: int = 1
  dropout_rate: float = 0.0

  def conv_layer(self, features: int, kernel: int, strides: int, name: str) -> nn.Module:
    return square_conv(self.conv, features, kernel, strides, name)

  def normalize(self, y: jax.Array, name: str) -> jax.Array:
    return y if self.norm is None else self.norm(name=name)(y)

  def shortcut(self, x: jax.Array, out_features: int) -> jax.Array:
    if x.shape[-1] == out_features and self.strides == 1:
      return x
    x = self.conv_layer(out_features, 1, self.strides, 'proj_conv')(x)
    return self.normalize(x, 'proj_norm')

  def drop(self, y: jax.Array, train: bool) -> jax.Array:
    return Dropout(self.dropout_rate, deterministic=not train)(y)


class BasicBlock(_Block):
  """Two 3x3 convs (ResNet-18/34)."""

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = self.conv_layer(self.features, 3, self.strides, 'conv1')(x)
    y = self.drop(nn.relu(self.normalize(y, 'norm1')), train)
    y = self.conv_layer(self.features, 3, 1, 'conv2')(y)
    y = self.normalize(y, 'norm2')
    return nn.relu(y + self.shortcut(x, self.features))


class BottleneckBlock(_Block):
  """1x1 reduce, 3x3 (strided: v1.5), 1x1 expand by 4 (ResNet-50/101/152)."""

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = self.conv_layer(self.features, 1, 1, 'conv1')(x)
    y = self.drop(nn.relu(self.normalize(y, 'norm1')), train)
    y = self.conv_layer(self.features, 3, self.strides, 'conv2')(y)
    y = self.drop(nn.relu(self.normalize(y, 'norm2')), train)
    y = self.conv_layer(self.features * 4, 1, 1, 'conv3')(y)
    y = self.normalize(y, 'norm3')
    return nn.relu(y + self.shortcut(x, self.features * 4))


class ResNet(nn.Module):
  """ResNet on NHWC input; returns logits in at least float32.

  Apply with train=True and rngs={'dropout': key}; with norm='batch' also
  mutable=['batch_stats'].
  """

  stage_sizes: Sequence[int]
  block_cls: type[_Block]
  num_classes: int = 1000
  norm: str = 'batch'
  dropout_rate: float = 0.0
  width: int = 64
  stem: str = 'imagenet'
  remat: bool = False
  dtype: Any = jnp.float32
  head_dropout_rate: float | None = None  # Before the classifier; None: dropout_rate.
  bn_groups: int = 1  # norm='batch': batch statistics per this many slices (devices).
  gn_groups: int = 16  # GROUP_NORMS: at most this many groups (gcd with the width).

  def __post_init__(self):
    if self.norm not in NORMS:
      raise ValueError(f'norm={self.norm!r} is not one of: {", ".join(NORMS)}')
    check_arguments(self.stem, self.width, self.dropout_rate)
    if self.head_dropout_rate is not None and not 0 <= self.head_dropout_rate < 1:
      raise ValueError(f'head_dropout_rate={self.head_dropout_rate!r} must be in [0, 1)')
    if not (isinstance(self.bn_groups, int) and self.bn_groups > 0):
      raise ValueError(f'bn_groups={self.bn_groups!r} must be a positive integer')
    if not (isinstance(self.gn_groups, int) and self.gn_groups > 0):
      raise ValueError(f'gn_groups={self.gn_groups!r} must be a positive integer')
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv, norm = LAYERS[self.norm](self, train)
    x = stem_conv(conv, self.width, self.stem, x)
    x = nn.relu(x if norm is None else norm(name='stem_norm')(x))
    if STEMS[self.stem].pool:
      x = max_pool(x, (3, 3), (2, 2), _pad(3))

    # self counts as argument 0, so `train` is 2; the name keeps the param tree
    # identical with and without remat.
    block_cls = nn.remat(self.block_cls, static_argnums=(2,)) if self.remat else self.block_cls
    for i, size in enumerate(self.stage_sizes):
      for j in range(size):
        x = block_cls(features=self.width * 2**i, conv=conv, norm=norm,
                      strides=2 if i > 0 and j == 0 else 1, dropout_rate=self.dropout_rate,
                      name=f'stage{i + 1}_block{j}')(x, train)

    x = jnp.mean(x, axis=(1, 2))
    head_rate = self.dropout_rate if self.head_dropout_rate is None else self.head_dropout_rate
    x = Dropout(head_rate, deterministic=not train)(x)
    return head(x, self.num_classes, self.dtype)


ResNet10 = functools.partial(ResNet, stage_sizes=(1, 1, 1, 1), block_cls=BasicBlock)
ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BottleneckBlock)
ResNet101 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), block_cls=BottleneckBlock)
ResNet152 = functools.partial(ResNet, stage_sizes=(3, 8, 36, 3), block_cls=BottleneckBlock)

MODELS = {'resnet10': ResNet10, 'resnet18': ResNet18, 'resnet34': ResNet34, 'resnet50': ResNet50,
          'resnet101': ResNet101, 'resnet152': ResNet152}

