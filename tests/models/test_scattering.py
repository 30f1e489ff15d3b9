import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnfree_jax.models.resnet import BasicBlock, ResNet
from bnfree_jax.models.scattering import output_channels, scattering, scattering_input

FIXTURE = os.path.join(os.path.dirname(__file__), os.pardir, 'fixtures', 'kymatio_scattering.npz')


@pytest.mark.parametrize('name, J', [('28', 2), ('30', 3)])
def test_scattering_matches_kymatio(name, J):
  """Kymatio's Scattering2D (tests/fixtures/make_kymatio_fixtures.py), float64:
  at J = 2 on two-channel 28 px images, and at J = 3 on 30 px, whose padding
  is uneven."""
  fixture = np.load(FIXTURE)
  x, want = fixture[f'x{name}'], fixture[f's{name}']  # [N, C, H, W], [N, C, K, h, w]
  got = jax.jit(scattering, static_argnums=1)(jnp.asarray(x.transpose(0, 2, 3, 1)), J)
  n, c, k, h, w = want.shape
  assert k == output_channels(J, 8)
  assert got.shape == (n, h, w, c * k)
  # Channel c's coefficients at c * K + k, as the docstring promises.
  np.testing.assert_allclose(np.asarray(got), want.transpose(0, 3, 4, 1, 2).reshape(got.shape),
                             atol=1e-6)


def test_scattering_is_translation_stable_and_rejects_non_square():
  """Its point: a 1 px shift moves the J = 2 coefficients far less than the
  pixels."""
  x = np.random.default_rng(1).random((1, 28, 28, 1)).astype(np.float32)
  x[:, :, :4] = x[:, :, -4:] = 0  # Room to shift without wrapping content.
  shifted = np.roll(x, 1, axis=2)
  s, s_shifted = jax.jit(scattering)(jnp.asarray(np.concatenate([x, shifted])))
  pixels = np.linalg.norm(shifted - x) / np.linalg.norm(x)
  coefficients = float(jnp.linalg.norm(s_shifted - s) / jnp.linalg.norm(s))
  assert coefficients < pixels / 3, (coefficients, pixels)
  with pytest.raises(ValueError, match='square images; got 28x30'):
    scattering(jnp.zeros((1, 28, 30, 1)))


def test_scatter_stem_is_the_small_stem_on_standardized_coefficients():
  """ResNet(stem='scatter') is the 'small' stem's net applied to
  scattering_input: the coefficients standardized in 27 groups of 3 within
  each example alone (numpy below), so nothing mixes the examples of a batch,
  as DP-SGD needs."""
  x = jnp.asarray(np.random.default_rng(2).random((3, 28, 28, 1)), jnp.float32)
  standardize = jax.jit(scattering_input)  # Eager, each shape's ops compile one by one: 4 s.
  features = standardize(x)
  groups = np.asarray(jax.jit(scattering)(x), np.float64).reshape(3, 7 * 7, 27, 3)
  mean, var = groups.mean(axis=(1, 3), keepdims=True), groups.var(axis=(1, 3), keepdims=True)
  np.testing.assert_allclose(features, ((groups - mean) / np.sqrt(var + 1e-5)).reshape(3, 7, 7, 81),
                             atol=1e-4)
  np.testing.assert_allclose(standardize(x[:1]), features[:1], atol=1e-4)

  one_stage = dict(stage_sizes=(1,), block_cls=BasicBlock, num_classes=10, width=8,
                   norm='group_ws')
  scatter, small = ResNet(stem='scatter', **one_stage), ResNet(stem='small', **one_stage)
  variables = jax.jit(functools.partial(scatter.init, train=False))(jax.random.key(0), x)
  np.testing.assert_allclose(jax.jit(functools.partial(scatter.apply, train=False))(variables, x),
                             jax.jit(functools.partial(small.apply, train=False))(variables, features),
                             rtol=1e-5, atol=1e-5)
