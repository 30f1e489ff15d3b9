"""Table 4, row "non-BN with adaptive clipping & dropout", step decrease, LR
0.001: weight-normalized ResNet-18, clipping from 5, dropout 0.1, LR 0.001
held for 30 epochs, then decreasing linearly to 0 at epoch 90 (footnote 6:
constant for the first epochs, then the standard decay). Paper: 68.9 train /
61.95 validation top-1.

  python -m bnfree_jax.main --config configs/paper/t4_step_lr0p001.py \
      --workdir runs/paper/t4_step_lr0p001

Append :small or :lowdata for its Fashion-MNIST twins (common.py).
"""

from configs.paper import common


def get_config(arg=None):
  return common.recipe(
      arg, norm='weight', lr=0.001, schedule='step', clip='adaptive', clip_from=5.0,
      dropout=True,
      paper=dict(
          table='4',
          row='non-BN with adaptive clipping & dropout, step decrease, LR 0.001',
          train_top1=68.9, val_top1=61.95))
