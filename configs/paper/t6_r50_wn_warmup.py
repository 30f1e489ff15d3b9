"""Table 6, ResNet-50 row "non-BN with adaptive clipping & dropout", warm-up:
the recipe of t5_warmup_momentum on ResNet-50 (LR 0.005 rising to 0.017
over 25 epochs, then linear decay; 120 epochs). Paper: 86.01 train / 62.22
validation top-1.

  python -m bnfree_jax.main --config configs/paper/t6_r50_wn_warmup.py \
      --workdir runs/paper/t6_r50_wn_warmup

Append :small or :lowdata for its Fashion-MNIST twins (common.py).
"""

from configs.paper import common


def get_config(arg=None):
  return common.recipe(
      arg, model='resnet50', norm='weight', schedule='warmup', clip='adaptive',
      clip_from=5.0, dropout=True, epochs=120,
      paper=dict(
          table='6',
          row='ResNet-50: non-BN with adaptive clipping & dropout, warm-up',
          train_top1=86.01, val_top1=62.22))
