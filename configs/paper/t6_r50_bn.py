"""Table 6, ResNet-50 row "batch normalized": LR 0.1 decreasing linearly over
90 epochs. Paper: 79.4 train / 72.6 validation top-1.

  python -m bnfree_jax.main --config configs/paper/t6_r50_bn.py \
      --workdir runs/paper/t6_r50_bn

Append :small or :lowdata for its Fashion-MNIST twins (common.py).
"""

from configs.paper import common


def get_config(arg=None):
  return common.recipe(
      arg, model='resnet50', norm='batch', lr=0.1,
      paper=dict(
          table='6',
          row='ResNet-50: batch normalized, monotonically decreasing',
          train_top1=79.4, val_top1=72.6))
