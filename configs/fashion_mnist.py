"""Quickstart: the paper's best recipe (configs/resnet18_wn.py) scaled to
Fashion-MNIST on a CPU: ResNet-18 without BN (weight-normalized convolutions,
log-scheduled clipping from 5, dropout, warm-up + linear decay), small stem,
reduced width.

  python -m bnfree_jax.main --config configs/fashion_mnist.py --workdir runs/fmnist

Expected: about 90% test top-1 (89.87% measured) in under 5 minutes on a
2-core CPU (README has the measured figures). Data: tfds's fashion_mnist if
prepared, else the original IDX files (Debian: apt-get install
dataset-fashion-mnist).
"""

from configs import resnet18_wn


def get_config():
  c = resnet18_wn.get_config()
  c.dataset = 'fashion_mnist'
  c.model.update(stem='small', width=16, dropout_rate=0.1)
  c.batch_size = 128
  c.num_epochs = 3
  c.lr_schedule.update(base_lr=0.1, warmup_init_lr=0.01, warmup_epochs=0.5)
  c.grad_clip.update(threshold=5.0, final_threshold=50.0)
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.histogram_every_steps = 200
  return c
