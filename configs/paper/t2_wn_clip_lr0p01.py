"""Table 2, row "non-BN with adaptive clipping", LR 0.01: weight-normalized
ResNet-18, clipping threshold rising logarithmically from 5, no dropout, LR 0.01
decreasing linearly over 90 epochs. Paper: 79.3 train / 63.6 validation top-1
(it overfits). Its gradients are Fig. 3c.

  python -m bnfree_jax.main --config configs/paper/t2_wn_clip_lr0p01.py \
      --workdir runs/paper/t2_wn_clip_lr0p01

Append :small or :lowdata for its Fashion-MNIST twins (common.py).
"""

from configs.paper import common


def get_config(arg=None):
  return common.recipe(
      arg, norm='weight', lr=0.01, clip='adaptive', clip_from=5.0,
      paper=dict(
          table='2',
          row='non-BN with adaptive clipping, LR 0.01',
          train_top1=79.3, val_top1=63.6,
          also=('Fig. 3c',)))
