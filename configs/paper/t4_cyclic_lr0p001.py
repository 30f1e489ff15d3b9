"""Table 4, row "non-BN with adaptive clipping & dropout", cyclic, LR 0.001:
weight-normalized ResNet-18, clipping from 5, dropout 0.1, triangular cyclic
LR between 0.0001 and 0.001 (half a cycle = 5 epochs), 90 epochs. Paper: 64.65
train / 59.7 validation top-1.

  python -m bnfree_jax.main --config configs/paper/t4_cyclic_lr0p001.py \
      --workdir runs/paper/t4_cyclic_lr0p001

Append :small or :lowdata for its Fashion-MNIST twins (common.py).
"""

from configs.paper import common


def get_config(arg=None):
  return common.recipe(
      arg, norm='weight', lr=0.001, schedule='cyclic', clip='adaptive', clip_from=5.0,
      dropout=True,
      paper=dict(
          table='4',
          row='non-BN with adaptive clipping & dropout, cyclic, LR 0.001',
          train_top1=64.65, val_top1=59.7))
