"""The linear model: a Dense layer on the standardized scattering
coefficients, the settings it refuses, and its per-example gradients under
DP-SGD, as tests/test_dp_sgd.py checks the ResNet's."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnfree_jax import models, train
from bnfree_jax.models.scattering import output_channels, scattering_input
from test_dp_sgd import PLAIN_SGD, check_clipped_sum, dp_config


def test_logits_are_a_dense_layer_on_the_scattering_features():
  model = models.create_model('linear', num_classes=5, norm='none', stem='scatter', width=8,
                              remat=False, dropout_rate=0.0)
  x = jnp.asarray(np.random.default_rng(0).random((3, 12, 12, 2)), jnp.float32)
  params = jax.jit(lambda: model.init(jax.random.key(0), x, train=False))()['params']
  # 12 px at J = 2: 3 x 3 positions, 81 coefficients per image channel.
  assert params['head']['kernel'].shape == (3 * 3 * 2 * output_channels(2, 8), 5)
  features = np.asarray(scattering_input(x)).reshape(3, -1).astype(np.float64)
  want = features @ np.float64(params['head']['kernel']) + np.float64(params['head']['bias'])
  np.testing.assert_allclose(jax.jit(lambda p: model.apply({'params': p}, x, train=True))(params),
                             want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('setting, message', [
    ({'norm': 'group_ws'}, "norm='group_ws': the linear model takes norm='none' only"),
    ({'stem': 'small'}, "stem='small': the linear model takes stem='scatter' only"),
    ({'dropout_rate': 0.1}, 'dropout_rate=0.1: the linear model takes dropout_rate=0.0 only'),
    ({'drop_path_rate': 0.1}, 'drop_path_rate=0.1 needs an nf_* model'),
])
def test_refuses_what_it_does_not_have(setting, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    models.create_model('linear', num_classes=5, **{'norm': 'none', **setting})


def test_dp_clipped_sum_is_single_example_gradients_clipped_by_hand():
  linear = {'model.name': 'linear', 'model.norm': 'none', 'model.stem': 'scatter'}
  s = train.setup(dp_config(**PLAIN_SGD, **linear), devices=jax.devices()[:1])
  check_clipped_sum(s, train.init_state(s), **linear)
