"""The recipe files outside configs/paper/: what each sets, with numbers."""

import pytest

from bnfree_jax import train
from conftest import load_config


def test_nf_resnet50_recipe_follows_nfnets():
  c = load_config('nf_resnet50.py')
  assert (c.model.name, c.model.norm, c.num_epochs) == ('nf_resnet50', 'scaled_ws', 90)
  assert (c.grad_clip.mode, c.grad_clip.agc_clipping, c.grad_clip.agc_eps) == ('agc', 0.01, 1e-3)
  assert (c.optimizer.nesterov, c.optimizer.weight_decay, c.optimizer.weight_decay_on) == (
      True, 5e-5, 'kernels')
  assert (c.label_smoothing, c.ema_decay) == (0.1, 0.9999)
  assert (c.lr_schedule.name, c.lr_schedule.warmup_epochs) == ('cosine', 5.0)
  assert c.lr_schedule.base_lr == pytest.approx(0.1)  # 0.1 x 256 / 256.
  c.batch_size = 1024  # As --config.batch_size=1024 would: the LR follows.
  assert c.lr_schedule.base_lr == pytest.approx(0.4)


def test_nf_resnet50_small_twin_runs_at_the_paper_twins_budget():
  s = train.setup(load_config('nf_resnet50.py', 'small'))
  c = s.config
  assert (c.model.name, c.model.width, c.model.stem, c.dataset) == (
      'nf_resnet18', 16, 'small', 'fashion_mnist')
  assert (s.total_steps, s.steps_per_epoch, s.optimizer.warmup_steps) == (936, 468, 52)
  lr = s.optimizer.learning_rate
  assert float(lr(26)) == pytest.approx(0.025)  # Half-way up to 0.1 x 128 / 256.
  assert float(lr(52)) == pytest.approx(0.05)
  assert float(lr(52 + 442)) == pytest.approx(0.025, rel=1e-3)  # Cosine half-way down.
  assert c.ema_decay == 0.999
