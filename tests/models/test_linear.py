"""The linear model: a Dense layer on the standardized scattering
coefficients, the settings it refuses, and its per-example gradients under
DP-SGD, as tests/test_dp_sgd.py checks the ResNet's."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnfree_jax import input_pipeline, models, privacy, train
from bnfree_jax.models.linear import features
from bnfree_jax.models.scattering import output_channels, scattering_input
from test_dp_sgd import PLAIN_SGD, check_clipped_sum, dp_config


@pytest.mark.parametrize('stem, scales', [('scatter', (2,)), ('scatter12', (2, 1))])
def test_logits_are_a_dense_layer_on_the_centered_scattering_features(stem, scales):
  model = models.create_model('linear', num_classes=5, norm='none', stem=stem, width=8,
                              remat=False, dropout_rate=0.0)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.random((3, 12, 12, 2)), jnp.float32)
  variables = jax.jit(lambda: model.init(jax.random.key(0), x, train=False))()
  params = variables['params']
  # 12 px at J = 2: 3 x 3 positions, 81 coefficients per image channel; at
  # J = 1: 6 x 6 positions, 9 coefficients.
  d = sum((12 // 2**J)**2 * 2 * output_channels(J, 8) for J in scales)
  assert params['head']['kernel'].shape == (d, 5)
  np.testing.assert_array_equal(variables['batch_stats']['feature_mean'], np.zeros(d))
  mean = rng.normal(size=d).astype(np.float32)
  coefficients = np.concatenate([np.asarray(scattering_input(x, J)).reshape(3, -1)
                                 for J in scales], axis=1).astype(np.float64)
  want = ((coefficients - mean) @ np.float64(params['head']['kernel'])
          + np.float64(params['head']['bias']))
  got = jax.jit(lambda p: model.apply(
      {'params': p, 'batch_stats': {'feature_mean': mean}}, x, train=True))(params)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # The bound the trainer's release of the mean takes as the sensitivity.
  norms = np.linalg.norm(features(x, stem), axis=1)
  assert np.all(norms <= np.sqrt(d))


@pytest.mark.parametrize('setting, message', [
    ({'norm': 'group_ws'}, "norm='group_ws': the linear model takes norm='none' only"),
    ({'stem': 'small'},
     "stem='small': the linear model takes stem='scatter' or stem='scatter12' only"),
    ({'dropout_rate': 0.1}, 'dropout_rate=0.1: the linear model takes dropout_rate=0.0 only'),
    ({'drop_path_rate': 0.1}, 'drop_path_rate=0.1 needs an nf_* model'),
])
def test_refuses_what_it_does_not_have(setting, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    models.create_model('linear', num_classes=5, **{'norm': 'none', **setting})


LINEAR = {'model.name': 'linear', 'model.norm': 'none', 'model.stem': 'scatter'}


def test_dp_clipped_sum_is_single_example_gradients_clipped_by_hand():
  s = train.setup(dp_config(**PLAIN_SGD, **LINEAR), devices=jax.devices()[:1])
  check_clipped_sum(s, train.init_state(s), **LINEAR)


@pytest.mark.parametrize('stem', ['scatter', 'scatter12'])
def test_released_feature_mean_is_the_mean_plus_gaussian_noise_of_the_bound(stem):
  """dp.feature_mean_noise: the mean of the training split's features (the
  stem's) plus N(0, (sigma_m sqrt(D) / N)^2) per coordinate, and its epsilon
  composed into the run's. A seeded check of the noise's spread over the D
  coordinates, its tolerance five standard errors of a sample std of D
  normal draws."""
  sigma_m = 3.0
  s = train.setup(dp_config(**PLAIN_SGD, **{**LINEAR, 'model.stem': stem,
                                            'dp.feature_mean_noise': sigma_m}),
                  devices=jax.devices()[:1])
  state = train.init_state(s)
  released = train.release_feature_mean(s, state)
  images, _ = input_pipeline._arrays(s.config, train=True)
  x = np.float64(features(input_pipeline._normalize(s.config, images), stem))
  n, d = x.shape
  assert np.linalg.norm(x, axis=1).max() <= np.sqrt(d)  # The clip changes nothing here.
  z = (np.float64(released.batch_stats['feature_mean']) - x.mean(axis=0)) * n / (
      sigma_m * np.sqrt(d))
  assert abs(z.std() - 1) < 5 / np.sqrt(2 * d) and abs(z.mean()) < 5 / np.sqrt(d)
  # Only the mean changed; the same seed releases the same mean.
  jax.tree.map(np.testing.assert_array_equal, released.params, state.params)
  np.testing.assert_array_equal(train.release_feature_mean(s, state).batch_stats['feature_mean'],
                                released.batch_stats['feature_mean'])
  q, delta = s.sampling_rate, s.config.dp.delta
  assert train.dp_epsilon(s, 0) == privacy.epsilon(q, 0, 0, delta, mean_noise=sigma_m) > 0
  assert train.dp_epsilon(s, 5) == privacy.epsilon(q, s.noise_multiplier, 5, delta,
                                                   mean_noise=sigma_m)
