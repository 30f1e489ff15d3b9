"""Table 1, row "ResNet-18": the batch-normalized baseline, LR 0.1 decreasing
linearly over 90 epochs. Paper: 73.01 train / 66.5 validation top-1. The same
run is the "batch normalized" row of Tables 2, 4, 5 and 6 and Fig. 3b.

  python -m bnfree_jax.main --config configs/paper/t1_bn.py \
      --workdir runs/paper/t1_bn

Append :small or :lowdata for its Fashion-MNIST twins (common.py).
"""

from configs.paper import common


def get_config(arg=None):
  return common.recipe(
      arg, norm='batch', lr=0.1,
      paper=dict(
          table='1',
          row='ResNet-18',
          train_top1=73.01, val_top1=66.5,
          also=('2', '4', '5', '6', 'Fig. 3b')))
