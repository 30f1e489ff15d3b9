"""Table 2, row "non-BN with adaptive clipping", LR 0.001: weight-normalized
ResNet-18, clipping threshold rising logarithmically from 5, no dropout, LR 0.001
decreasing linearly over 90 epochs. Paper: 76.25 train / 59.6 validation top-1.
Its gradients are Fig. 3d.

  python -m bnfree_jax.main --config configs/paper/t2_wn_clip_lr0p001.py \
      --workdir runs/paper/t2_wn_clip_lr0p001

Append :small or :lowdata for its Fashion-MNIST twins (common.py).
"""

from configs.paper import common


def get_config(arg=None):
  return common.recipe(
      arg, norm='weight', lr=0.001, clip='adaptive', clip_from=5.0,
      paper=dict(
          table='2',
          row='non-BN with adaptive clipping, LR 0.001',
          train_top1=76.25, val_top1=59.6,
          also=('Fig. 3d',)))
