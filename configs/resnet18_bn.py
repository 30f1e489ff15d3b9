"""ResNet-18 with batch normalization on ImageNet: the paper's baseline.

Paper Table 1/2 row "batch normalized": LR 0.1 decreasing monotonically, 90
epochs; 73.01 train / 66.5 validation top-1.

  python -m bnfree_jax.main --config configs/resnet18_bn.py --workdir runs/r18_bn \
      --config.data_dir=~/tensorflow_datasets
"""

from configs import default


def get_config():
  c = default.get_config()
  c.model.update(name='resnet18', norm='batch')
  c.lr_schedule.update(name='linear', base_lr=0.1)
  c.num_epochs = 90
  return c
