"""Table 6, ResNet-34 row "batch normalized": LR 0.1 decreasing linearly over
90 epochs. Paper: 77.6 train / 70.1 validation top-1.

  python -m bnfree_jax.main --config configs/paper/t6_r34_bn.py \
      --workdir runs/paper/t6_r34_bn

Append :small or :lowdata for its Fashion-MNIST twins (common.py).
"""

from configs.paper import common


def get_config(arg=None):
  return common.recipe(
      arg, model='resnet34', norm='batch', lr=0.1,
      paper=dict(
          table='6',
          row='ResNet-34: batch normalized, monotonically decreasing',
          train_top1=77.6, val_top1=70.1))
