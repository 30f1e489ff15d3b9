"""ResNets with batch-, weight- or no normalization, and weight-norm utilities."""

from bnfree_jax.models.layers import (
    RELU_GAMMA,
    DropPath,
    Dropout,
    WNConv,
    WSConv,
    data_dependent_init,
    weight_decay_mask,
)
from bnfree_jax.models.resnet import (
    MODELS,
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
    create_model,
)

__all__ = [
    'MODELS', 'NORMS', 'RELU_GAMMA', 'STEMS', 'BasicBlock', 'BottleneckBlock', 'DropPath',
    'Dropout', 'ResNet', 'ResNet18', 'ResNet34', 'ResNet50', 'ResNet101', 'ResNet152', 'WNConv',
    'WSConv', 'create_model', 'data_dependent_init', 'weight_decay_mask',
]
