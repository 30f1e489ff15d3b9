"""ResNet-34 with batch normalization on ImageNet (paper Table 6: 77.6 train /
70.1 validation top-1; LR 0.1 decreasing monotonically, 90 epochs).

  python -m bnfree_jax.main --config configs/resnet34_bn.py --workdir runs/r34_bn
"""

from configs import resnet18_bn


def get_config():
  c = resnet18_bn.get_config()
  c.model.name = 'resnet34'
  return c
