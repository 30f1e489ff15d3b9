"""PyTorch state dicts -> flax variables: one layout per model family.

A layout lists (torch_key, flax_collection, flax_path, transform) entries;
transform names how the PyTorch array becomes the flax one (_TRANSFORMS).
"""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np

from bnfree_jax.models.nf_resnet import NFBottleneckBlock, NFResNet

Entry = tuple[str, str, tuple[str, ...], str]

_TRANSFORMS = {
    'conv': lambda w: w.transpose(2, 3, 1, 0),  # OIHW -> HWIO
    'linear': lambda w: w.T,  # (out, in) -> (in, out)
    'copy': lambda w: w,
    'gain': lambda g: g.reshape(-1),  # timm's ScaledStdConv2d gain (O, 1, 1, 1) -> (O,)
}


def timm_nf_resnet_layout(model: NFResNet) -> list[Entry]:
  """timm's NormFreeNet nf_resnet26/50/101 (any channel config) -> NFResNet params."""
  if not isinstance(model, NFResNet) or model.block_cls is not NFBottleneckBlock:
    raise ValueError(f'{type(model).__name__} with {getattr(model, "block_cls", None)} is not '
                     'one of: NFResNet with NFBottleneckBlock (timm has no basic-block NF-ResNet)')

  def ws_conv(torch_prefix, path):
    return [(f'{torch_prefix}.weight', 'params', (*path, 'kernel'), 'conv'),
            (f'{torch_prefix}.bias', 'params', (*path, 'bias'), 'copy'),
            (f'{torch_prefix}.gain', 'params', (*path, 'gain'), 'gain')]

  entries = ws_conv('stem.conv', ('stem_conv',))
  for spec in model.blocks():
    prefix = f'stages.{spec.stage}.{spec.index}'
    if spec.projects:
      entries += ws_conv(f'{prefix}.downsample.conv', (spec.name, 'proj_conv'))
    for conv in ('conv1', 'conv2', 'conv3'):
      entries += ws_conv(f'{prefix}.{conv}', (spec.name, conv))
  entries += [('head.fc.weight', 'params', ('head', 'kernel'), 'linear'),
              ('head.fc.bias', 'params', ('head', 'bias'), 'copy')]
  return entries


def _apply_layout(state_dict, model, entries: list[Entry], image_shape=(32, 32, 3)):
  """The flax variables of `model` from a state dict of arrays, by `entries`.

  ValueError unless every state-dict key is used and every variable of
  model.init on an image_shape input is filled, at its shape.
  """
  missing = [key for key, *_ in entries if key not in state_dict]
  unused = sorted(set(state_dict) - {key for key, *_ in entries})
  if missing or unused:
    raise ValueError(f'state dict keys missing: {missing or "none"}; unused: {unused or "none"}')
  flat = {(collection, *path): jnp.asarray(_TRANSFORMS[transform](np.asarray(state_dict[key])))
          for key, collection, path, transform in entries}
  expected = flax.traverse_util.flatten_dict(jax.eval_shape(
      functools.partial(model.init, train=False), jax.random.key(0),
      jnp.zeros((1, *image_shape))))
  wrong = sorted(str(p) for p in set(flat) | set(expected)
                 if p not in flat or p not in expected or flat[p].shape != expected[p].shape)
  if wrong:
    raise ValueError(f'variables unfilled, unknown or of the wrong shape: {", ".join(wrong)}')
  return flax.traverse_util.unflatten_dict(flat)
