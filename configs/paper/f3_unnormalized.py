"""ResNet-18 without any normalization (paper Fig. 3a): BN removed and nothing
in its place, no clipping, LR 1e-5 decreasing linearly over 90 epochs, the
highest LR at which it did not diverge. It did not learn either ("similar to
random selection"); the paper reports no accuracy. Its gradient histograms are
the point (grad_log10_magnitude/* in TensorBoard).

  python -m bnfree_jax.main --config configs/paper/f3_unnormalized.py \
      --workdir runs/paper/f3_unnormalized

Append :small to the config for its Fashion-MNIST twin (common.py).
"""

from configs.paper import common


def get_config(arg=None):
  return common.recipe(
      arg, norm='none', lr=1e-5,
      paper=dict(
          table='Fig. 3a',
          row='ResNet 18 trained with no normalization and regularization method',
          train_top1=None, val_top1=None))
