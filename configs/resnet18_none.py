"""ResNet-18 without any normalization on ImageNet: the paper's unnormalized
baseline (Fig. 3a). It only avoids divergence at LR 1e-5 and then does not
learn; the paper reports no accuracy for it.

  python -m bnfree_jax.main --config configs/resnet18_none.py --workdir runs/r18_none
"""

from configs import default


def get_config():
  c = default.get_config()
  c.model.update(name='resnet18', norm='none')
  c.lr_schedule.update(name='linear', base_lr=1e-5)
  c.num_epochs = 90
  return c
