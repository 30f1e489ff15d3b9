"""Normalizer-free ResNets (Brock, De & Smith 2021a) built exactly as timm builds them.

nf_resnet26/50/101 are timm's: pre-activation bottleneck blocks, every conv a
scaled weight-standardized WSConv with the ReLU's gamma folded in, residual
branches scaled by alpha=0.2 and their inputs by beta = 1/sqrt(expected
variance), the last conv's gain starting at 0, stochastic depth rising
linearly over the blocks. nf_resnet18/34 are pre-activation basic-block
members of the same family (timm and DeepMind have none) for CPU-scale runs.
timm rounds channels to multiples of 8; here they are multiples of `width`
exactly, the same for any width divisible by 8 (64 gives timm's counts).

norm: these nets normalize their weights themselves, so the only norm they
take is 'scaled_ws' (the default); any other is a ValueError.
"""

import functools
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bnfree_jax.models.layers import RELU_GAMMA, DropPath, Dropout, WSConv, head, max_pool
from bnfree_jax.models.resnet import STEMS, ModuleDef, check_arguments, square_conv, stem_conv

NORM = 'scaled_ws'
ALPHA = 0.2


def avg_pool_ceil(x: jax.Array) -> jax.Array:
  """timm's DownsampleAvg pool: AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)."""
  # Ceil mode on an odd side is one more window, over the last row/column alone.
  pad = ((0, x.shape[1] % 2), (0, x.shape[2] % 2))
  return nn.avg_pool(x, (2, 2), strides=(2, 2), padding=pad, count_include_pad=False)


class _NFBlock(nn.Module):
  features: int
  conv: ModuleDef
  strides: int = 1
  beta: float = 1.0
  drop_path_rate: float = 0.0

  def conv_layer(self, features: int, kernel: int, strides: int, name: str,
                 **kwargs) -> nn.Module:
    return square_conv(functools.partial(self.conv, **kwargs), features, kernel, strides, name)

  def shortcut(self, x: jax.Array, out: jax.Array, out_features: int) -> jax.Array:
    """x, or (timm's DownsampleAvg) a 1x1 conv of the pre-activation `out`,
    average-pooled first when strided."""
    if x.shape[-1] == out_features and self.strides == 1:
      return x
    if self.strides != 1:
      out = avg_pool_ceil(out)
    return self.conv_layer(out_features, 1, 1, 'proj_conv')(out)

  def merge(self, r: jax.Array, shortcut: jax.Array, train: bool) -> jax.Array:
    r = DropPath(self.drop_path_rate, deterministic=not train)(r)
    return r * ALPHA + shortcut


class NFBasicBlock(_NFBlock):
  """relu(x) * beta, then two 3x3 WSConvs (the first strided); the second's gain starts at 0."""

  expansion = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    out = nn.relu(x) * self.beta
    shortcut = self.shortcut(x, out, self.features)
    r = self.conv_layer(self.features, 3, self.strides, 'conv1')(out)
    r = self.conv_layer(self.features, 3, 1, 'conv2', gain_init=0.0)(nn.relu(r))
    return self.merge(r, shortcut, train)


class NFBottleneckBlock(_NFBlock):
  """timm's NormFreeBlock: relu(x) * beta, 1x1, 3x3 (strided), 1x1 expanding by 4
  whose gain starts at 0."""

  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    out = nn.relu(x) * self.beta
    shortcut = self.shortcut(x, out, self.features * 4)
    r = self.conv_layer(self.features, 1, 1, 'conv1')(out)
    r = self.conv_layer(self.features, 3, self.strides, 'conv2')(nn.relu(r))
    r = self.conv_layer(self.features * 4, 1, 1, 'conv3', gain_init=0.0)(nn.relu(r))
    return self.merge(r, shortcut, train)


class BlockSpec(NamedTuple):
  name: str
  stage: int  # From 0, as timm's stages.S.B keys.
  index: int
  features: int
  strides: int
  projects: bool
  beta: float
  drop_path_rate: float


class NFResNet(nn.Module):
  """NF-ResNet on NHWC input; returns logits in at least float32.

  Apply with train=True and rngs={'dropout': key} (dropout before the head
  and stochastic depth draw from it).
  """

  stage_sizes: Sequence[int]
  block_cls: type[_NFBlock]
  num_classes: int = 1000
  norm: str = NORM
  dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  width: int = 64
  stem: str = 'imagenet'
  remat: bool = False
  dtype: Any = jnp.float32

  def __post_init__(self):
    if self.norm != NORM:
      raise ValueError(f'norm={self.norm!r} is not one of: {NORM} (NF-ResNets normalize '
                       'their weights by scaled weight standardization, no other norm)')
    check_arguments(self.stem, self.width, self.dropout_rate)
    if not 0 <= self.drop_path_rate < 1:
      raise ValueError(f'drop_path_rate={self.drop_path_rate!r} must be in [0, 1)')
    super().__post_init__()

  @nn.nowrap
  def blocks(self) -> Iterator[BlockSpec]:
    """Each block's name, place, features, strides, projection, beta and drop-path rate."""
    rates = np.linspace(0, self.drop_path_rate, sum(self.stage_sizes))
    expected_var, in_features, k = 1.0, self.width, 0
    for i, size in enumerate(self.stage_sizes):
      for j in range(size):
        features, strides = self.width * 2**i, 2 if i > 0 and j == 0 else 1
        projects = strides != 1 or in_features != features * self.block_cls.expansion
        yield BlockSpec(f'stage{i + 1}_block{j}', i, j, features, strides, projects,
                        expected_var**-0.5, float(rates[k]))
        # A projection sees the beta-scaled input, so its output starts at unit
        # variance again; timm resets after each stage's first block, which for
        # bottlenecks is the same (each projects).
        if projects:
          expected_var = 1.0
        expected_var += ALPHA**2
        in_features, k = features * self.block_cls.expansion, k + 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = functools.partial(WSConv, gamma=RELU_GAMMA, dtype=self.dtype)
    # No activation after the stem: each block starts with its own ReLU.
    x = stem_conv(conv, self.width, self.stem, x)
    if STEMS[self.stem].pool:
      x = max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))

    # As ResNet: `train` is argument 2 and the param tree is the same with remat.
    block_cls = nn.remat(self.block_cls, static_argnums=(2,)) if self.remat else self.block_cls
    for spec in self.blocks():
      x = block_cls(features=spec.features, conv=conv, strides=spec.strides, beta=spec.beta,
                    drop_path_rate=spec.drop_path_rate, name=spec.name)(x, train)

    x = jnp.mean(nn.relu(x), axis=(1, 2))
    x = Dropout(self.dropout_rate, deterministic=not train)(x)
    return head(x, self.num_classes, self.dtype, nn.initializers.normal(0.01))


NFResNet18 = functools.partial(NFResNet, stage_sizes=(2, 2, 2, 2), block_cls=NFBasicBlock)
NFResNet34 = functools.partial(NFResNet, stage_sizes=(3, 4, 6, 3), block_cls=NFBasicBlock)
NFResNet26 = functools.partial(NFResNet, stage_sizes=(2, 2, 2, 2), block_cls=NFBottleneckBlock)
NFResNet50 = functools.partial(NFResNet, stage_sizes=(3, 4, 6, 3), block_cls=NFBottleneckBlock)
NFResNet101 = functools.partial(NFResNet, stage_sizes=(3, 4, 23, 3), block_cls=NFBottleneckBlock)

MODELS = {'nf_resnet18': NFResNet18, 'nf_resnet34': NFResNet34, 'nf_resnet26': NFResNet26,
          'nf_resnet50': NFResNet50, 'nf_resnet101': NFResNet101}
