"""Table 6, ResNet-50 row "non-BN with adaptive clipping & dropout",
monotonically decreasing: weight-normalized ResNet-50, clipping from 5,
dropout 0.1, LR 0.01 decreasing linearly over 90 epochs. Paper: 82.4 train /
62.8 validation top-1.

  python -m bnfree_jax.main --config configs/paper/t6_r50_wn_monotonic.py \
      --workdir runs/paper/t6_r50_wn_monotonic

Append :small or :lowdata for its Fashion-MNIST twins (common.py).
"""

from configs.paper import common


def get_config(arg=None):
  return common.recipe(
      arg, model='resnet50', norm='weight', lr=0.01, clip='adaptive', clip_from=5.0,
      dropout=True,
      paper=dict(
          table='6',
          row='ResNet-50: non-BN with adaptive clipping & dropout, monotonically decreasing',
          train_top1=82.4, val_top1=62.8))
