"""Table 1, row "ResNet-18 + weight normalization": BN replaced by
weight-normalized convolutions with bias (Fig. 1b), no clipping, LR 0.001
decreasing linearly over 90 epochs. Paper: 71.01 train / 58.5 validation top-1.

  python -m bnfree_jax.main --config configs/paper/t1_wn.py \
      --workdir runs/paper/t1_wn

Append :small or :lowdata for its Fashion-MNIST twins (common.py).
"""

from configs.paper import common


def get_config(arg=None):
  return common.recipe(
      arg, norm='weight', lr=0.001,
      paper=dict(
          table='1',
          row='ResNet-18 + weight normalization',
          train_top1=71.01, val_top1=58.5))
