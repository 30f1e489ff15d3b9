"""ResNet-18 without any normalization (paper Fig. 3a): BN removed and nothing
in its place, no clipping, LR 1e-5 decreasing linearly over 90 epochs, the
highest LR at which it did not diverge. It did not learn either ("similar to
random selection"); the paper reports no accuracy. Its gradient histograms are
the point (grad_log10_magnitude/* in TensorBoard).

  python -m bnfree_jax.main --config configs/paper/f3_unnormalized.py \
      --workdir runs/paper/f3_unnormalized

Append :small or :lowdata to the config for its Fashion-MNIST twins
(common.py). They keep the row's definition, the highest LR that does not
diverge, which on Fashion-MNIST is SMALL_LR: over the 936 steps of :small 0.1
went non-finite at step 145 and 0.3 at step 21, while 0.03 trained to the end
(results/paper_small). :lowdata takes it untried: same data, budget and model.
"""

from configs.paper import common


SMALL_LR = 0.03


def get_config(arg=None):
  c = common.recipe(
      arg, norm='none', lr=1e-5,
      paper=dict(
          table='Fig. 3a',
          row='ResNet 18 trained with no normalization and regularization method',
          train_top1=None, val_top1=None))
  if arg in ('small', 'lowdata'):
    c.lr_schedule.base_lr = SMALL_LR
  return c
