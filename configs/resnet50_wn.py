"""ResNet-50 without BN, the ResNet-18 recipe of configs/resnet18_wn.py with
bottleneck blocks of weight-normalized convolutions (paper Table 6, warm-up
row: 86.01 train / 62.22 validation top-1, vs. 72.6 with BN: it overfits).

  python -m bnfree_jax.main --config configs/resnet50_wn.py --workdir runs/r50_wn
"""

from configs import resnet18_wn


def get_config():
  c = resnet18_wn.get_config()
  c.model.name = 'resnet50'
  return c
