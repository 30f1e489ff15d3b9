"""Table 3, row "10" (initial clip value): t2_wn_clip_dropout_lr0p01 with the
clipping threshold rising logarithmically from 10 instead of 5 (to the same 50).
Paper: 72.2 train / 64.6 validation top-1. Table 3's row "5" (72.3 / 64.7) is
configs/paper/t2_wn_clip_dropout_lr0p01.py itself.

  python -m bnfree_jax.main --config configs/paper/t3_clip10.py \
      --workdir runs/paper/t3_clip10

Append :small or :lowdata for its Fashion-MNIST twins (common.py).
"""

from configs.paper import common


def get_config(arg=None):
  return common.recipe(
      arg, norm='weight', lr=0.01, clip='adaptive', clip_from=10.0, dropout=True,
      paper=dict(
          table='3',
          row='initial clip value 10',
          train_top1=72.2, val_top1=64.6))
