"""ResNet-50 with batch normalization on ImageNet (paper Table 6: 79.4 train /
72.6 validation top-1; LR 0.1 decreasing monotonically, 90 epochs).

  python -m bnfree_jax.main --config configs/resnet50_bn.py --workdir runs/r50_bn
"""

from configs import resnet18_bn


def get_config():
  c = resnet18_bn.get_config()
  c.model.name = 'resnet50'
  return c
