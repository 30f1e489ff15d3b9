"""ResNet-34 without BN, the ResNet-18 recipe of configs/resnet18_wn.py
(paper Table 6, warm-up row: 75.2 train / 68.01 validation top-1, vs. 70.1
with BN).

  python -m bnfree_jax.main --config configs/resnet34_wn.py --workdir runs/r34_wn
"""

from configs import resnet18_wn


def get_config():
  c = resnet18_wn.get_config()
  c.model.name = 'resnet34'
  return c
