"""ResNet-18 without BN: the paper's best recipe (Table 5, 74.7 train / 65.1
validation top-1 on ImageNet, vs. 66.5 with BN).

Weight-normalized convolutions with bias in place of conv + BN (Fig. 1b),
gradient clipping by global norm with a threshold moving log-linearly per epoch
from 5, dropout in every residual branch, and a warm-up followed by linear
decay over 120 epochs.

Read from the paper, where it is not explicit:
- Warm-up from 0.005 (Table 6: "0.005 for warm-up schedule") up to 0.017 (the
  highest LR this network reached, sec. 3.3), ending around epoch 25 where
  Fig. 4 shows the change of slope.
- The threshold rises from 5 to 50 ("increased in a logarithmic manner",
  Table 2 text); pass --config.grad_clip.final_threshold=0.5 for the
  "reduced" reading of sec. 3.3.
- Dropout rate 0.1 and momentum correction on (Table 5 "adaptive momentum").

  python -m bnfree_jax.main --config configs/resnet18_wn.py --workdir runs/r18 \
      --config.batch_size=512
"""

from configs import default


def get_config():
  c = default.get_config()
  c.model.update(name='resnet18', norm='weight', dropout_rate=0.1)
  c.lr_schedule.update(name='linear', base_lr=0.017, warmup_epochs=25,
                       warmup_init_lr=0.005, end_lr=0.0)
  c.grad_clip.update(mode='log', threshold=5.0, final_threshold=50.0)
  c.optimizer.momentum_correction = True
  c.num_epochs = 120
  return c
