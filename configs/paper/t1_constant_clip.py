"""Table 1, row "ResNet-18 + constant gradient clipping threshold": BN removed,
no other normalization, gradients clipped by global norm at a constant 5 (the
paper gives no value; 5 is its later choice), LR 0.001 decreasing linearly
over 90 epochs. Paper: 70.50 train / 58.2 validation top-1.

  python -m bnfree_jax.main --config configs/paper/t1_constant_clip.py \
      --workdir runs/paper/t1_constant_clip

Append :small or :lowdata for its Fashion-MNIST twins (common.py).
"""

from configs.paper import common


def get_config(arg=None):
  return common.recipe(
      arg, norm='none', lr=0.001, clip='constant', clip_from=5.0,
      paper=dict(
          table='1',
          row='ResNet-18 + constant gradient clipping threshold',
          train_top1=70.5, val_top1=58.2))
