"""The 2-D scattering transform (Bruna & Mallat 2013), a fixed front end.

Morlet wavelets at J scales and L angles, a modulus, again, then a Gaussian
low-pass and subsampling by 2**J: SIFT-like features with no parameters,
computed per example. Under DP-SGD it is a prior that costs no privacy
(Tramer & Boneh 2021 train on it). The filters and every step follow
Kymatio's `Scattering2D` (the same padding, periodization and order of the
outputs), against whose output tests/models/test_scattering.py holds this
one. Kymatio is not a dependency: its 0.3 (2022, the latest) fails to import
under SciPy >= 1.15, and the transform is 50 lines of jnp.fft.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def _gabor(size: int, sigma: float, theta: float, xi: float, slant: float = 1.0) -> np.ndarray:
  """A size x size Gabor filter in space, periodized over 5 x 5 tiles."""
  rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
  curv = rot @ np.diag([1.0, slant**2]) @ rot.T / (2 * sigma**2)
  tiles = np.arange(-2, 3)[:, None] * size + np.arange(size)  # [5, size]
  x, y = tiles.reshape(-1)[:, None], tiles.reshape(-1)[None, :]
  arg = (-(curv[0, 0] * x * x + (curv[0, 1] + curv[1, 0]) * x * y + curv[1, 1] * y * y)
         + 1j * xi * (x * np.cos(theta) + y * np.sin(theta)))
  gabor = np.exp(arg).reshape(5, size, 5, size).sum(axis=(0, 2))
  return gabor / (2 * 3.1415 * sigma**2 / slant)  # Kymatio's rounded pi.


def _morlet(size: int, sigma: float, theta: float, xi: float, slant: float) -> np.ndarray:
  """A Gabor minus the Gaussian that makes its mean exactly zero."""
  wave, envelope = _gabor(size, sigma, theta, xi, slant), _gabor(size, sigma, theta, 0, slant)
  return wave - wave.sum() / envelope.sum() * envelope


def _periodize(fourier: np.ndarray, res: int) -> np.ndarray:
  """The filter for an image subsampled by 2**res, its high frequencies cut."""
  size, k = fourier.shape[0], 2**res
  keep = np.ones(size, bool)
  keep[int(size * 2**(-res - 1)):int(size * 2**(-res - 1)) + int(size * (1 - 2**-res))] = False
  cut = fourier * np.outer(keep, keep)
  return cut.reshape(k, size // k, k, size // k).sum(axis=(0, 2))


@functools.lru_cache(maxsize=None)
def filter_bank(size: int, J: int, L: int) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
  """Real Fourier-domain filters of a size x size padded image.

  Returns (phi, psi): phi[res] the low-pass at resolution 2**-res; psi[j][res]
  the L wavelets of scale j at that resolution, stacked [L, size/2**res, ...].
  """
  def fourier(signal):
    return np.real(np.fft.fft2(signal)).astype(np.float32)

  phi_full = fourier(_gabor(size, 0.8 * 2**(J - 1), 0, 0))
  phi = [_periodize(phi_full, res) for res in range(J)]
  psi = []
  for j in range(J):
    full = [fourier(_morlet(size, 0.8 * 2**j, (L // 2 - 1 - theta) * np.pi / L,
                            3 / 4 * np.pi / 2**j, 4 / L)) for theta in range(L)]
    psi.append([np.stack([_periodize(f, res) for f in full]) for res in range(max(j, 1))])
  return phi, psi


def padded_size(size: int, J: int) -> int:
  """Kymatio's padded size: a multiple of 2**J at least 2**J + 1 beyond `size`."""
  return ((size + 2**J) // 2**J + 1) * 2**J


def output_channels(J: int, L: int) -> int:
  """Coefficients per input channel: 1 + J L + L^2 J (J - 1) / 2."""
  return 1 + J * L + L * L * J * (J - 1) // 2


def _subsample(x: jax.Array, k: int) -> jax.Array:
  """Fourier transform of the spatial subsampling x[::k, ::k] (its periodization)."""
  *lead, m, n = x.shape
  return x.reshape(*lead, k, m // k, k, n // k).mean(axis=(-4, -2))


def scattering(images: jax.Array, J: int = 2, L: int = 8) -> jax.Array:
  """Order-2 scattering coefficients of NHWC images.

  [N, H, W, C] with H = W -> [N, H / 2**J, W / 2**J, C * output_channels(J, L)],
  the coefficients of channel c at c * output_channels + k, k in Kymatio's
  order (order 0, then 1 by (j, theta), then 2 by (j1, theta1, j2, theta2)).
  """
  n, size, width, channels = images.shape
  if size != width:
    raise ValueError(f'scattering takes square images; got {size}x{width}')
  padded = padded_size(size, J)
  phi, psi = filter_bank(padded, J, L)
  pad = ((padded - size) // 2, (padded - size + 1) // 2)
  x = jnp.moveaxis(images.astype(jnp.float32), -1, 1)  # [N, C, H, W]
  x = jnp.pad(x, ((0, 0), (0, 0), pad, pad), mode='reflect')
  x_hat = jnp.fft.fft2(x)

  def low_pass(u_hat, res):  # -> real coefficients [..., size / 2**J, size / 2**J]
    s = jnp.fft.ifft2(_subsample(u_hat * phi[res], 2**(J - res))).real
    return s[..., 1:-1, 1:-1]

  def wavelets(u_hat, j, res):  # -> Fourier transforms of |u * psi_{j, theta}|, over theta
    u = jnp.fft.ifft2(_subsample(u_hat[..., None, :, :] * psi[j][res], 2**(j - res)))
    return jnp.fft.fft2(jnp.abs(u))

  first = [wavelets(x_hat, j1, 0) for j1 in range(J)]  # [N, C, L, ...] each
  out = [low_pass(x_hat, 0)[:, :, None]] + [low_pass(u_hat, j1) for j1, u_hat in enumerate(first)]
  for j1 in range(J - 1):
    # [N, C, L (theta1), J - 1 - j1 (j2), L (theta2), h, w]: Kymatio's order.
    second = jnp.stack([low_pass(wavelets(first[j1], j2, j1), j2) for j2 in range(j1 + 1, J)],
                       axis=3)
    out.append(second.reshape(n, channels, -1, *second.shape[-2:]))
  coefficients = jnp.concatenate(out, axis=2)  # [N, C, K, h, w]
  return jnp.moveaxis(coefficients, (1, 2), (3, 4)).reshape(n, *coefficients.shape[-2:], -1)


def scattering_input(images: jax.Array, J: int = 2) -> jax.Array:
  """The J coefficients of each example, standardized: stem='scatter''s input
  (J = 2), and with J = 1 the rest of the linear model's stem='scatter12'.

  Tramer & Boneh's data normalization for DP-SGD: a GroupNorm without
  parameters over groups of 3 of the coefficients of each channel (27 groups
  of the 81 at J = 2, 3 of the 9 at J = 1), per example, so nothing mixes the
  examples of a batch.
  """
  x = scattering(images, J=J)
  return nn.GroupNorm(num_groups=x.shape[-1] // 3, use_bias=False, use_scale=False,
                      epsilon=1e-5).apply({}, x)
