"""configs/paper/: every row (found by glob, so new files are covered) loads and
builds its model and optimizer at paper scale and as its small and tiny twins,
carries the paper's figures, and documents its command; a few rows are checked
against the paper's text. The small and low-data twins are set up on the real
Fashion-MNIST (Debian's dataset-fashion-mnist)."""

import pathlib

import jax
import jax.numpy as jnp
import pytest
import tensorflow_datasets as tfds

from bnfree_jax import models, optim, train
from conftest import REPO, load_config

ROWS = sorted(p.stem for p in (REPO / 'configs' / 'paper').glob('*.py')
              if p.stem not in ('__init__', 'common'))
IMAGENET_TRAIN = 1_281_167  # 5004 steps per epoch at batch 256.
# Fashion-MNIST at batch 128: 468 steps per epoch, 46 on its first 6000 examples.
SPE = {None: 5004, 'small': 468, 'lowdata': 46}


def config(stem, arg=None):
  return load_config(f'paper/{stem}.py', arg)


def build(c):
  """train.setup (ImageNet's metadata mocked: the data is not here), then the
  parameter and optimizer-state shapes, traced but not computed."""
  if c.dataset == 'imagenet2012':
    with tfds.testing.mock_data(num_examples=IMAGENET_TRAIN):
      s = train.setup(c)
  else:
    s = train.setup(c)
  image = jnp.zeros((1, *s.info.image_shape))
  variables = jax.eval_shape(lambda: s.model.init(jax.random.key(0), image, train=False))
  jax.eval_shape(s.optimizer.tx.init, variables['params'])
  return s


def test_every_table_has_rows():
  tables = {config(stem).paper.table for stem in ROWS}
  assert {'1', '2', '3', '4', '5', '6', 'Fig. 3a'} <= tables
  assert len(ROWS) >= 18


@pytest.mark.parametrize('stem', ROWS)
def test_paper_scale_builds(stem):
  c = config(stem)
  s = build(c)
  assert (c.dataset, c.batch_size, c.optimizer.momentum, c.optimizer.weight_decay,
          c.optimizer.weight_decay_on) == ('imagenet2012', 256, 0.9, 1e-4, 'all')
  assert s.steps_per_epoch == 5004
  assert s.total_steps == c.num_epochs * 5004
  assert c.num_epochs == (120 if 'warmup' in stem else 90)
  lr = s.optimizer.learning_rate
  assert float(lr(s.total_steps)) < 0.11 * c.lr_schedule.base_lr  # Ends low.


@pytest.mark.parametrize('arg', ['small', 'lowdata', 'tiny'])
@pytest.mark.parametrize('stem', ROWS)
def test_twins_build_with_the_rows_recipe(stem, arg):
  full, c = config(stem), config(stem, arg)
  s = build(c)
  assert c.model.stem == 'small' and c.paper == full.paper
  own_lr = stem == 'f3_unnormalized' and arg != 'tiny'  # Its SMALL_LR.
  for key in ('model.name', 'model.norm', 'model.dropout_rate', 'lr_schedule.name',
              'lr_schedule.base_lr', 'grad_clip.mode', 'grad_clip.threshold',
              'grad_clip.final_threshold', 'optimizer.weight_decay_on'):
    if not (own_lr and key == 'lr_schedule.base_lr'):
      assert c[key] == full[key], key
  if arg != 'tiny':
    assert (c.dataset, c.model.width, c.batch_size) == ('fashion_mnist', 16, 128)
  if arg == 'small':
    # One budget for every row: 2 Fashion-MNIST epochs.
    assert s.total_steps == 936 == c.num_epochs * s.steps_per_epoch
    assert (c.train_subset, s.info.num_train) == (-1, 60000)
  elif arg == 'lowdata':
    # 20 epochs of the first 6000 examples, 920 steps; the whole test split
    # every 2 epochs, the train metrics every half epoch.
    assert (c.train_subset, s.info.num_train, s.info.num_eval) == (6000, 6000, 10000)
    assert (s.steps_per_epoch, c.num_epochs, s.total_steps) == (46, 20, 920)
    assert (s.eval_every_steps, c.log_every_steps) == (92, 23)
  else:
    assert (c.dataset, c.model.width, s.info.image_shape) == ('synthetic', 8, (16, 16, 3))
    assert s.total_steps <= 8
  # Epoch-based settings shrink with the run, so the schedules keep their shape.
  scale = c.num_epochs / full.num_epochs
  assert c.lr_schedule.warmup_epochs == pytest.approx(full.lr_schedule.warmup_epochs * scale)
  for key in ('cycle_epochs', 'hold_epochs', 'staircase_epochs'):
    assert c.lr_schedule[key] == pytest.approx(full.lr_schedule[key] * scale), key


@pytest.mark.parametrize('stem', ROWS)
def test_metadata_and_docstring(stem):
  c = config(stem)
  assert set(c.paper) == {'table', 'row', 'train_top1', 'val_top1', 'also'}
  assert c.paper.table and c.paper.row
  doc = load_module_doc(stem)
  assert f'--config configs/paper/{stem}.py' in doc
  assert f'--workdir runs/paper/{stem}' in doc
  assert (f'Table {c.paper.table}' in doc) or (c.paper.table in doc)
  for figure in (c.paper.train_top1, c.paper.val_top1):
    if figure is not None:
      assert f'{figure:g}' in doc, (stem, figure)
  assert stem in (REPO / 'configs' / 'paper' / '__init__.py').read_text()


def load_module_doc(stem):
  import ast
  return ast.get_docstring(ast.parse((REPO / 'configs' / 'paper' / f'{stem}.py').read_text()))


def test_rows_are_unique():
  keys = [(config(s).paper.table, config(s).paper.row) for s in ROWS]
  assert len(set(keys)) == len(keys)


def test_spot_checks_against_the_paper():
  bn = config('t1_bn')
  assert (bn.model.norm, bn.lr_schedule.name, bn.lr_schedule.base_lr, bn.grad_clip.mode,
          bn.paper.train_top1, bn.paper.val_top1) == ('batch', 'linear', 0.1, 'none', 73.01, 66.5)
  for stem in ('t1_constant_clip', 't1_wn'):  # Table 1: non-BN at LR 0.001.
    assert config(stem).lr_schedule.base_lr == 0.001
  assert config('t1_constant_clip').grad_clip.mode == 'constant'
  assert config('t1_wn').grad_clip.mode == 'none'

  t2 = config('t2_wn_clip_dropout_lr0p01')
  assert (t2.model.norm, t2.model.dropout_rate, t2.lr_schedule.base_lr, t2.grad_clip.mode,
          t2.grad_clip.threshold, t2.paper.train_top1, t2.paper.val_top1) == (
              'weight', 0.1, 0.01, 'log_curve', 5.0, 72.34, 64.7)
  assert config('t2_wn_clip_lr0p001').model.dropout_rate == 0.0
  assert config('t3_clip10').grad_clip.threshold == 10.0

  cyc = config('t4_cyclic_lr0p001').lr_schedule
  assert (cyc.name, cyc.base_lr, cyc.min_lr) == ('cyclic', 0.001, pytest.approx(1e-4))

  warm = build(config('t6_r50_wn_warmup'))  # Table 6: 0.005 for warm-up.
  assert warm.config.model.name == 'resnet50' and warm.config.num_epochs == 120
  assert float(warm.optimizer.learning_rate(0)) == pytest.approx(0.005)
  # configs/resnet18_wn.py's warm-up, with the decay in one step per epoch.
  ours, theirs = config('t5_warmup_momentum').lr_schedule, load_config('resnet18_wn.py').lr_schedule
  assert ours.staircase_epochs == 1.0 and theirs.staircase_epochs == 0.0
  assert {k: v for k, v in ours.items() if k != 'staircase_epochs'} == {
      k: v for k, v in theirs.items() if k != 'staircase_epochs'}

  f3 = config('f3_unnormalized')
  assert (f3.model.norm, f3.lr_schedule.base_lr, f3.paper.val_top1) == ('none', 1e-5, None)
  # Its twins take the row's definition, the highest LR that does not diverge there.
  for arg in ('small', 'lowdata'):
    assert config('f3_unnormalized', arg).lr_schedule.base_lr == 0.03


def schedules(stem, arg=None):
  """The row's optimizer (steps per epoch given, so no dataset is read)."""
  c = config(stem, arg)
  total = c.num_train_steps if c.num_train_steps > 0 else c.num_epochs * SPE[arg]
  return optim.create_optimizer(c, SPE[arg], total, models.weight_decay_mask)


# (stem, twin, {step: LR}), from the readings in common.py's docstring.
LR_CHECKS = [
    # Linear to 0 over 90 epochs, one value per epoch: epoch e at 0.1 (1 - e / 90).
    ('t1_bn', None, {0: 0.1, 5003: 0.1, 5004: 0.1 * 89 / 90, 45 * 5004: 0.05,
                     89 * 5004 + 5003: 0.1 / 90, 90 * 5004: 0.0}),
    # Held at 0.001 for 30 epochs, then linear over the other 60, per epoch.
    ('t4_step_lr0p001', None, {0: 1e-3, 30 * 5004: 1e-3, 31 * 5004 - 1: 1e-3,
                               31 * 5004: 1e-3 * 59 / 60, 60 * 5004: 5e-4,
                               89 * 5004: 1e-3 / 60}),
    # 0.005 -> 0.017 over 25 epochs, every step; then 95 epochs to 0, per epoch.
    ('t5_warmup_momentum', None, {0: 0.005, 12.5 * 5004: 0.011, 25 * 5004: 0.017,
                                  26 * 5004 - 1: 0.017, 26 * 5004: 0.017 * 94 / 95,
                                  119 * 5004: 0.017 / 95}),
    # Twins: 936 steps; stairs of 2/90 epoch = 10 steps (2/120 epoch = 8 for
    # the warm-up rows); hold 2/3 epoch = 312 steps; warm-up 5/12 epoch = 195.
    ('t2_wn_clip_dropout_lr0p01', 'small', {0: 0.01, 9: 0.01, 10: 0.01 * (1 - 10 / 936),
                                            935: 0.01 * 6 / 936}),
    ('t4_step_lr0p001', 'small', {311: 1e-3, 321: 1e-3, 322: 1e-3 * (1 - 10 / 624),
                                  935: 1e-3 * 4 / 624}),
    ('t5_warmup_momentum', 'small', {0: 0.005, 195: 0.017, 202: 0.017,
                                     203: 0.017 * (1 - 8 / 741)}),
    # Low-data twins: 920 steps of 46 per epoch; stairs of 20/90 epoch = 10
    # steps (20/120 = 8); hold 20/3 epochs = 307 steps; warm-up 25/6 = 192;
    # half a cycle 10/9 epoch = 51.
    ('t2_wn_clip_dropout_lr0p01', 'lowdata', {0: 0.01, 9: 0.01, 10: 0.01 * (1 - 10 / 920),
                                              460: 0.005, 919: 0.01 * 10 / 920}),
    ('t4_step_lr0p001', 'lowdata', {306: 1e-3, 316: 1e-3, 317: 1e-3 * (1 - 10 / 613),
                                    919: 1e-3 * 3 / 613}),
    ('t5_warmup_momentum', 'lowdata', {0: 0.005, 96: 0.011, 192: 0.017, 199: 0.017,
                                       200: 0.017 * (1 - 8 / 728)}),
    ('t4_cyclic_lr0p01', 'lowdata', {0: 1e-3, 51: 0.01, 102: 1e-3, 918: 1e-3}),
]


@pytest.mark.parametrize('stem,arg,checks', LR_CHECKS)
def test_learning_rates_at_given_steps(stem, arg, checks):
  lr = schedules(stem, arg).learning_rate
  for step, want in checks.items():
    assert float(lr(int(step))) == pytest.approx(want, rel=1e-5, abs=1e-9), step


# (stem, twin, {epoch: threshold}): 5 + a ln(1 + epoch), a = 45 / ln 90 = 10.0004
# over 90 epochs (45 / ln 120 = 9.3997 over 120); Table 3: 10 + 40 ln(1 + epoch) / ln 90.
CLIP_CHECKS = [
    ('t2_wn_clip_dropout_lr0p01', None, {0: 5.0, 1: 11.93176, 9: 28.02682, 89: 50.0}),
    ('t3_clip10', None, {0: 10.0, 1: 16.16157, 89: 50.0}),
    ('t6_r34_wn_warmup', None, {0: 5.0, 1: 11.51523, 119: 50.0}),
    ('t1_constant_clip', None, {0: 5.0, 89: 5.0}),
    # The twin's 2 epochs: the first at 5, the second at 50.
    ('t4_cyclic_lr0p01', 'small', {0: 5.0, 1: 50.0}),
    # The low-data twin's 20: 5 + a ln(1 + epoch), a = 45 / ln 20 = 15.0214.
    ('t2_wn_clip_dropout_lr0p01', 'lowdata', {0: 5.0, 1: 15.41202, 9: 39.58798, 19: 50.0}),
    ('t3_clip10', 'lowdata', {0: 10.0, 19: 50.0}),
]


@pytest.mark.parametrize('stem,arg,checks', CLIP_CHECKS)
def test_clip_thresholds_per_epoch(stem, arg, checks):
  threshold = schedules(stem, arg).clip_threshold
  for epoch, want in checks.items():
    for step in (epoch * SPE[arg], (epoch + 1) * SPE[arg] - 1):
      assert float(threshold(step)) == pytest.approx(want, rel=1e-5), (epoch, step)


def test_the_low_data_twin_tells_the_clipping_readings_apart():
  # 'log', 5 -> 50 by a constant factor per epoch, is 5 * 10^(e / 19) there.
  c = config('t2_wn_clip_dropout_lr0p01', 'lowdata')
  c.grad_clip.mode = 'log'
  threshold = optim.clip_threshold_schedule(c.grad_clip, 46, 20)
  for epoch, want in {0: 5.0, 1: 5.64419, 9: 14.88176, 19: 50.0}.items():
    assert float(threshold(epoch * 46)) == pytest.approx(want, rel=1e-5), epoch


def test_unknown_twin_is_an_error():
  with pytest.raises(ValueError, match='small, lowdata, tiny'):
    config('t1_wn', 'large')
