"""Table 6, ResNet-34 row "non-BN with adaptive clipping & dropout", warm-up:
the recipe of t5_warmup_momentum on ResNet-34 (LR 0.005 rising to 0.017
over 25 epochs, then linear decay; 120 epochs). Paper: 75.2 train / 68.01
validation top-1.

  python -m bnfree_jax.main --config configs/paper/t6_r34_wn_warmup.py \
      --workdir runs/paper/t6_r34_wn_warmup

Append :small or :lowdata for its Fashion-MNIST twins (common.py).
"""

from configs.paper import common


def get_config(arg=None):
  return common.recipe(
      arg, model='resnet34', norm='weight', schedule='warmup', clip='adaptive',
      clip_from=5.0, dropout=True, epochs=120,
      paper=dict(
          table='6',
          row='ResNet-34: non-BN with adaptive clipping & dropout, warm-up',
          train_top1=75.2, val_top1=68.01))
