"""A linear classifier on an image's standardized scattering coefficients:
Tramer & Boneh (2021)'s ScatterNet + linear, the strongest published
Fashion-MNIST model under DP-SGD at epsilon 3 (89.7 %). It has no norm
layers and no stages, so it takes model.norm='none' only, and a stem that
names its features: 'scatter', their J = 2 coefficients (7 x 7 positions of
a 28 px image), or 'scatter12', those and the J = 1 coefficients (14 x 14
positions: finer in space, coarser in scale), concatenated. model.width and
remat, which the trainer passes every model, mean nothing to it.

The features are centered on 'feature_mean', zeros unless the trainer
releases the training set's mean feature privately (dp.feature_mean_noise):
a statistic, not a trained parameter, so it lives in the 'batch_stats'
collection, which the trainer checkpoints and never differentiates.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bnfree_jax.models.layers import head
from bnfree_jax.models.scattering import scattering_input


# model.stem -> the scales J whose standardized coefficients are the features.
STEMS = {'scatter': (2,), 'scatter12': (2, 1)}


def features(images: jax.Array, stem: str = 'scatter') -> jax.Array:
  """[N, H, W, C] images -> [N, D]: the stem's standardized scattering
  coefficients, each row of norm at most sqrt(D) (at most unit variance in
  each group)."""
  return jnp.concatenate([scattering_input(images, J).reshape(images.shape[0], -1)
                          for J in STEMS[stem]], axis=1)


class Linear(nn.Module):
  """Logits = W . (features(image) - feature_mean) + b: one Dense layer, 'head'."""

  num_classes: int = 1000
  norm: str = 'none'
  stem: str = 'scatter'
  dropout_rate: float = 0.0
  head_dropout_rate: float | None = None
  width: int = 0  # Unused: see the module docstring.
  remat: bool = False  # Unused.
  gn_groups: int = 0  # Unused: the trainer passes these two with norms it refuses,
  bn_groups: int = 1  # which __post_init__ names.
  dtype: Any = jnp.float32

  def __post_init__(self):
    for field, value, allowed in (('norm', self.norm, ('none',)), ('stem', self.stem, STEMS),
                                  ('dropout_rate', self.dropout_rate, (0.0,)),
                                  ('head_dropout_rate', self.head_dropout_rate or 0.0, (0.0,))):
      if value not in allowed:
        raise ValueError(f'{field}={value!r}: the linear model takes '
                         f"{' or '.join(f'{field}={a!r}' for a in allowed)} only "
                         '(no norm layers, the scattering features, no dropout)')
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = features(x, self.stem)
    mean = self.variable('batch_stats', 'feature_mean', jnp.zeros, x.shape[1:], jnp.float32)
    return head(x - mean.value, self.num_classes, self.dtype)


MODELS = {'linear': Linear}
