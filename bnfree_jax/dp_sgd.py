"""Differential privacy, device side: per-example clipped gradient sums, the
Gaussian noise, and augmentation multiplicity. The trainer's DP step
(train.dp_accumulate, train.dp_apply) assembles them; bnfree_jax/privacy.py
samples the batches and accounts for the privacy spent.
"""

import jax
import jax.numpy as jnp
import numpy as np

from bnfree_jax.models import layers

AUGMENT_PAD = 4  # Pixels of pad-crop (reflected), as CIFAR's usual 4.
# Keeps C / ||g|| finite for a zero gradient and the clipped norm strictly
# below C in float32 (Opacus's 1e-6).
_NORM_EPS = 1e-6


def augment(image: jax.Array, key: jax.Array, copies: int) -> jax.Array:
  """`copies` random pad-crop-flips [copies, H, W, C] of one image [H, W, C]."""
  padded = jnp.pad(image, ((AUGMENT_PAD,) * 2, (AUGMENT_PAD,) * 2, (0, 0)), mode='reflect')

  def one(key):
    crop_key, flip_key = jax.random.split(key)
    top, left = jax.random.randint(crop_key, (2,), 0, 2 * AUGMENT_PAD + 1)
    crop = jax.lax.dynamic_slice(padded, (top, left, 0), image.shape)
    return jnp.where(jax.random.bernoulli(flip_key), crop[:, ::-1], crop)
  return jax.vmap(one)(jax.random.split(key, copies))


def clip_scale(norms: jax.Array, bound: float) -> jax.Array:
  """The factors that bring rows of these L2 norms to at most `bound`."""
  return jnp.minimum(1.0, bound / (norms + _NORM_EPS))


def clipped_sum(example_grad, params, examples, mask, l2_clip: float):
  """(sum over examples of each gradient clipped to L2 norm l2_clip, the
  examples' auxiliary outputs, their gradient norms before clipping).

  example_grad(params, example) -> (gradient tree, aux) for one example (a
  pytree of per-example rows); it is vmapped over the rows of `examples`.
  Rows whose mask is False contribute exactly zero.
  """
  with layers.per_example_gradients():
    grads, aux = jax.vmap(example_grad, in_axes=(None, 0))(params, examples)
  norms = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32)), axis=tuple(range(1, g.ndim)))
                       for g in jax.tree.leaves(grads)))
  scale = jnp.where(mask, clip_scale(norms, l2_clip), 0.0)
  # where, not a product: a masked row with a non-finite gradient adds nothing either.
  summed = jax.tree.map(
      lambda g: jnp.tensordot(scale.astype(g.dtype),
                              jnp.where(mask.reshape(-1, *[1] * (g.ndim - 1)), g, 0), axes=1),
      grads)
  return summed, aux, norms


def gaussian_noise(key: jax.Array, like, std) -> dict:
  """N(0, std^2) of the shapes and dtypes of the tree `like`: one draw for the
  whole tree, a function of the key alone, so every device and every mesh
  size adds the same noise."""
  leaves, treedef = jax.tree.flatten(like)
  sizes = [x.size for x in leaves]
  # One threefry draw, sliced: a draw per leaf (a threefry kernel each) made
  # XLA:CPU take 6.9 s instead of 4.1 to compile the tests' DP update.
  flat = std * jax.random.normal(key, (sum(sizes),), jnp.float32)
  parts = jnp.split(flat, np.cumsum(sizes)[:-1])
  return jax.tree.unflatten(treedef, [p.reshape(x.shape).astype(x.dtype)
                                      for p, x in zip(parts, leaves)])
