"""ResNets with batch-, weight- or no normalization, NF-ResNets, a linear
model on scattering features, and weight-norm utilities."""

from bnfree_jax.models import linear, nf_resnet, resnet
from bnfree_jax.models.layers import (
    RELU_GAMMA,
    DropPath,
    Dropout,
    WNConv,
    WSConv,
    data_dependent_init,
    weight_decay_mask,
)
from bnfree_jax.models.linear import Linear
from bnfree_jax.models.nf_resnet import (
    NFBasicBlock,
    NFBottleneckBlock,
    NFResNet,
    NFResNet18,
    NFResNet26,
    NFResNet34,
    NFResNet50,
    NFResNet101,
)
from bnfree_jax.models.resnet import (
    GROUP_NORMS,
    LAYERS,
    NORMS,
    STEMS,
    BasicBlock,
    BottleneckBlock,
    ResNet,
    ResNet18,
    ResNet34,
    ResNet50,
    ResNet101,
    ResNet152,
)

RESNETS = {**resnet.MODELS, **nf_resnet.MODELS}  # What the bench measures.
MODELS = {**RESNETS, **linear.MODELS}


def create_model(name: str, **kwargs) -> ResNet | NFResNet | Linear:
  """MODELS[name.lower()](**kwargs).

  drop_path_rate=0 is accepted, and dropped, for the models without
  stochastic depth (all but nf_*), so that a trainer can pass the same kwargs
  to all.
  """
  key = name.lower()
  if key not in MODELS:
    raise ValueError(f'model {name!r} is not one of: {", ".join(MODELS)}')
  if key not in nf_resnet.MODELS and 'drop_path_rate' in kwargs:
    rate = kwargs.pop('drop_path_rate')
    if rate != 0:
      raise ValueError(f'drop_path_rate={rate!r} needs an nf_* model; {key} has no stochastic '
                       'depth (allowed: 0.0)')
  return MODELS[key](**kwargs)


__all__ = [
    'GROUP_NORMS', 'LAYERS', 'MODELS', 'NORMS', 'RELU_GAMMA', 'RESNETS', 'STEMS', 'BasicBlock',
    'BottleneckBlock', 'DropPath', 'Dropout', 'Linear', 'NFBasicBlock', 'NFBottleneckBlock',
    'NFResNet', 'NFResNet18', 'NFResNet26', 'NFResNet34', 'NFResNet50', 'NFResNet101', 'ResNet',
    'ResNet18', 'ResNet34', 'ResNet50', 'ResNet101', 'ResNet152', 'WNConv', 'WSConv',
    'create_model', 'data_dependent_init', 'weight_decay_mask',
]
