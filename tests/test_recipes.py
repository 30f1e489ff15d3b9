"""The recipe files outside configs/paper/: what each sets, with numbers."""

import pytest

from bnfree_jax import privacy, train
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
  # An epoch of warm-up up to 0.8 (tuned, docstring), then cosine to 0.
  assert (s.total_steps, s.steps_per_epoch, s.optimizer.warmup_steps) == (936, 468, 468)
  lr = s.optimizer.learning_rate
  assert float(lr(234)) == pytest.approx(0.4)
  assert float(lr(468)) == pytest.approx(0.8)
  assert float(lr(468 + 234)) == pytest.approx(0.4, rel=1e-3)  # Cosine half-way down.
  assert float(lr(935)) == pytest.approx(0.0, abs=1e-5)
  assert (c.ema_decay, c.grad_clip.agc_clipping) == (0.999, 0.2)


def test_dp_recipe_spends_exactly_its_epsilon_over_its_planned_steps():
  s = train.setup(load_config('dp_fashion_mnist.py'))
  c = s.config
  assert (c.model.name, c.model.norm, c.dp.enabled, c.dp.l2_clip, c.dp.delta) == (
      'resnet10', 'group_ws', True, 1.0, 1e-5)
  assert (s.total_steps, s.sampling_rate) == (1740, pytest.approx(1024 / 60000))
  epsilon = privacy.epsilon(s.sampling_rate, s.noise_multiplier, s.total_steps, c.dp.delta)
  assert 2.99 < epsilon <= 3.0
  assert privacy.epsilon(s.sampling_rate, 0.99 * s.noise_multiplier, s.total_steps,
                         c.dp.delta) > 3.0


def test_dp_linear_recipe_is_tramer_and_bonehs_and_spends_exactly_its_epsilon():
  s = train.setup(load_config('dp_fashion_mnist.py', 'linear'))
  c = s.config
  assert (c.model.name, c.model.norm, c.model.stem, c.dp.l2_clip, c.lr_schedule.base_lr) == (
      'linear', 'none', 'scatter', 0.1, 16.0)
  # 40 epochs of the trainer's 60000 // 8192 = 7 steps.
  assert (s.total_steps, s.sampling_rate) == (280, pytest.approx(8192 / 60000))
  epsilon = privacy.epsilon(s.sampling_rate, s.noise_multiplier, s.total_steps, c.dp.delta)
  assert 2.99 < epsilon <= 3.0
  with pytest.raises(ValueError,
                     match='the variants are: linear, linear_centered, linear_scatter12'):
    load_config('dp_fashion_mnist.py', 'linaer')


@pytest.mark.parametrize('variant, stem', [('linear_centered', 'scatter'),
                                           ('linear_scatter12', 'scatter12')])
def test_dp_linear_centered_recipes_spend_exactly_their_epsilon_with_the_mean(variant, stem):
  s = train.setup(load_config('dp_fashion_mnist.py', variant))
  c = s.config
  assert (c.model.name, c.model.stem, c.dp.feature_mean_noise, s.total_steps) == (
      'linear', stem, 20.0, 280)
  # The steps' noise rises a little so that steps and mean together spend 3.
  assert s.noise_multiplier == pytest.approx(3.337, abs=1e-3)
  assert 2.99 < train.dp_epsilon(s, s.total_steps) <= 3.0
  assert privacy.epsilon(s.sampling_rate, s.noise_multiplier, s.total_steps, c.dp.delta) < 3.0
