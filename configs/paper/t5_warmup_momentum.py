"""Table 5, row "non-BN with adaptive clipping & dropout" (warm-up LR and
adaptive momentum, the paper's best non-BN result): weight-normalized
ResNet-18, clipping from 5, dropout 0.1, LR 0.005 rising to 0.017 over 25
epochs then decreasing linearly, 120 epochs: configs/resnet18_wn.py. Paper:
74.7 train / 65.1 validation top-1. The same run is Table 6's ResNet-18
warm-up row.

  python -m bnfree_jax.main --config configs/paper/t5_warmup_momentum.py \
      --workdir runs/paper/t5_warmup_momentum

Append :small or :lowdata for its Fashion-MNIST twins (common.py).
"""

from configs.paper import common


def get_config(arg=None):
  return common.recipe(
      arg, norm='weight', schedule='warmup', clip='adaptive', clip_from=5.0,
      dropout=True, epochs=120,
      paper=dict(
          table='5',
          row='non-BN with adaptive clipping & dropout',
          train_top1=74.7, val_top1=65.1,
          also=('6',)))
