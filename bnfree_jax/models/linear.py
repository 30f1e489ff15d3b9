"""A linear classifier on an image's standardized scattering coefficients:
Tramer & Boneh (2021)'s ScatterNet + linear, the strongest published
Fashion-MNIST model under DP-SGD at epsilon 3 (89.7 %). It has no norm
layers and no stages, so it takes model.norm='none' and model.stem='scatter'
only; model.width and remat, which the trainer passes every model, mean
nothing to it.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bnfree_jax.models.layers import head
from bnfree_jax.models.scattering import scattering_input


class Linear(nn.Module):
  """Logits = W . scattering_input(image) + b: one Dense layer, 'head'."""

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
    for field, value, allowed in (('norm', self.norm, 'none'), ('stem', self.stem, 'scatter'),
                                  ('dropout_rate', self.dropout_rate, 0.0),
                                  ('head_dropout_rate', self.head_dropout_rate or 0.0, 0.0)):
      if value != allowed:
        raise ValueError(f'{field}={value!r}: the linear model takes {field}={allowed!r} only '
                         '(no norm layers, the scattering features, no dropout)')
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = scattering_input(x)
    return head(x.reshape(x.shape[0], -1), self.num_classes, self.dtype)


MODELS = {'linear': Linear}
