"""configs/paper/: every row (found by glob, so new files are covered) loads and
builds its model and optimizer at paper scale and as its small and tiny twins,
carries the paper's figures, and documents its command; a few rows are checked
against the paper's text."""

import pathlib

import jax
import jax.numpy as jnp
import pytest
import tensorflow_datasets as tfds

from bnfree_jax import train
from conftest import REPO, load_config

ROWS = sorted(p.stem for p in (REPO / 'configs' / 'paper').glob('*.py')
              if p.stem not in ('__init__', 'common'))
IMAGENET_TRAIN = 1_281_167  # 5004 steps per epoch at batch 256.


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
  assert (c.dataset, c.batch_size, c.optimizer.momentum, c.optimizer.weight_decay) == (
      'imagenet2012', 256, 0.9, 1e-4)
  assert s.steps_per_epoch == 5004
  assert s.total_steps == c.num_epochs * 5004
  assert c.num_epochs == (120 if 'warmup' in stem else 90)
  lr = s.optimizer.learning_rate
  assert float(lr(s.total_steps)) < 0.11 * c.lr_schedule.base_lr  # Ends low.


@pytest.mark.parametrize('arg', ['small', 'tiny'])
@pytest.mark.parametrize('stem', ROWS)
def test_twins_build_with_the_rows_recipe(stem, arg):
  full, c = config(stem), config(stem, arg)
  s = build(c)
  assert c.model.stem == 'small' and c.paper == full.paper
  for key in ('model.name', 'model.norm', 'model.dropout_rate', 'lr_schedule.name',
              'lr_schedule.base_lr', 'grad_clip.mode', 'grad_clip.threshold'):
    if not (stem, arg, key) == ('f3_unnormalized', 'small', 'lr_schedule.base_lr'):
      assert c[key] == full[key], key
  if arg == 'small':
    assert (c.dataset, c.model.width, c.batch_size) == ('fashion_mnist', 16, 128)
    # One budget for every row: 2 Fashion-MNIST epochs.
    assert s.total_steps == 936 == c.num_epochs * s.steps_per_epoch
  else:
    assert (c.dataset, c.model.width, s.info.image_shape) == ('synthetic', 8, (16, 16, 3))
    assert s.total_steps <= 8
  # Epoch-based settings shrink with the run, so the schedules keep their shape.
  scale = c.num_epochs / full.num_epochs
  assert c.lr_schedule.warmup_epochs == pytest.approx(full.lr_schedule.warmup_epochs * scale)
  assert c.lr_schedule.cycle_epochs == pytest.approx(full.lr_schedule.cycle_epochs * scale)


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
              'weight', 0.1, 0.01, 'log', 5.0, 72.34, 64.7)
  assert config('t2_wn_clip_lr0p001').model.dropout_rate == 0.0
  assert config('t3_clip10').grad_clip.threshold == 10.0

  cyc = config('t4_cyclic_lr0p001').lr_schedule
  assert (cyc.name, cyc.base_lr, cyc.min_lr) == ('cyclic', 0.001, pytest.approx(1e-4))
  step = build(config('t4_step_lr0p001'))
  lr = step.optimizer.learning_rate
  assert float(lr(30 * 5004 - 1)) == pytest.approx(1e-3)
  assert float(lr(30 * 5004)) == pytest.approx(1e-4)

  warm = build(config('t6_r50_wn_warmup'))  # Table 6: 0.005 for warm-up.
  assert warm.config.model.name == 'resnet50' and warm.config.num_epochs == 120
  assert float(warm.optimizer.learning_rate(0)) == pytest.approx(0.005)
  assert config('t5_warmup_momentum').lr_schedule == load_config('resnet18_wn.py').lr_schedule

  f3 = config('f3_unnormalized')
  assert (f3.model.norm, f3.lr_schedule.base_lr, f3.paper.val_top1) == ('none', 1e-5, None)
  # Its twin takes the row's definition, the highest LR that does not diverge there.
  assert config('f3_unnormalized', 'small').lr_schedule.base_lr == 0.03


def test_unknown_twin_is_an_error():
  with pytest.raises(ValueError, match='small, tiny'):
    config('t1_wn', 'large')
