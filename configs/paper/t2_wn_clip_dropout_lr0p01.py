"""Table 2, row "non-BN with adaptive clipping & dropout", LR 0.01: weight-normalized
ResNet-18, clipping threshold rising logarithmically from 5, dropout 0.1, LR 0.01
decreasing linearly over 90 epochs. Paper: 72.34 train / 64.7 validation top-1.
The same run is Table 3's row "5" (72.3 / 64.7), Table 4's monotonic-decrease
row and Table 6's ResNet-18 monotonically-decreasing row.

  python -m bnfree_jax.main --config configs/paper/t2_wn_clip_dropout_lr0p01.py \
      --workdir runs/paper/t2_wn_clip_dropout_lr0p01

Append :small or :lowdata for its Fashion-MNIST twins (common.py).
"""

from configs.paper import common


def get_config(arg=None):
  return common.recipe(
      arg, norm='weight', lr=0.01, clip='adaptive', clip_from=5.0, dropout=True,
      paper=dict(
          table='2',
          row='non-BN with adaptive clipping & dropout, LR 0.01',
          train_top1=72.34, val_top1=64.7,
          also=('3', '4', '6')))
