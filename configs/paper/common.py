"""Shared pieces of the configs/paper/ rows: every row file is one recipe() call.

`get_config(arg)` of a row gives, by arg:
  None     the paper's run: ImageNet, batch 256, SGD momentum 0.9, weight decay
           1e-4 (configs/default.py), 90 epochs (120 for the warm-up rows).
  'small'  its twin on Fashion-MNIST: small stem, width 16, batch 128 and the
           same budget for every row, SMALL_STEPS = 2 epochs; epoch-based
           settings (warm-up, LR steps, cycle length) shrink by 2 / the row's
           epochs, the clipping threshold's per-epoch schedule spans the 2
           epochs. LR, normalization, clipping and dropout stay the row's.
  'tiny'   a few steps on 16 px synthetic data at width 8, for smoke tests.

Readings of the paper where it is not explicit:
- "monotonic(ally) decrease(ing)": lr_schedule 'linear' from the row's LR to 0
  over the run, per step (sec. 3.3: "decreased monotonically for every epoch").
- Table 1 "constant gradient clipping threshold": clipping by global norm at 5,
  the initial value sec. 3.3 settles on; the network has no normalization at
  all (sec. 3.3 compares clipping *with* weight normalization, and Fig. 6 has
  "only clip norm" and "only weight norm").
- "adaptive clipping": mode 'log', the threshold moving log-linearly per epoch
  from 5 (Table 3: also 10) to 50, as configs/resnet18_wn.py reads "increased
  in a logarithmic manner"; Table 3's two rows differ in the start only.
- "step decrease" (footnote 6: constant for the first epochs, then decay):
  x0.1 at epochs 30, 60 and 80, the usual ImageNet steps.
- "cyclic" (Smith 2015, triangular): from LR/10 up to LR and back, half a
  cycle lasting 5 epochs, so 90 epochs hold 9 whole cycles and end at LR/10.
- "warm-up" (Table 5; Table 6, "0.005 for warm-up schedule"): the schedule of
  configs/resnet18_wn.py, 0.005 rising to 0.017 over 25 epochs, then linear
  decay to 0; 120 epochs.
- "dropout": rate 0.1 (inside every residual branch and before the classifier).
- Momentum: every row uses PyTorch's SGD form (the buffer holds raw gradients,
  the LR scales the step), which the paper used and which already is Goyal et
  al.'s momentum correction (bnfree_jax/optim.py, momentum_sgd). Table 5's
  "adaptive momentum" therefore changes nothing here; the paper saw no gain.

c.paper holds what the paper reports for the row, in percent, for the report
tool: table, row, train_top1, val_top1 (None where not reported), and `also`,
the other tables (or figure panels) in which the same run appears.
"""

import ml_collections

from configs import default, resnet18_wn

STEP_EPOCHS = (30, 60, 80)
STEP_FACTOR = 0.1
CYCLE_HALF_EPOCHS = 5.0
CLIP_FINAL = 50.0
DROPOUT = 0.1

SMALL_EPOCHS = 2
SMALL_STEPS = SMALL_EPOCHS * (60_000 // 128)  # 936: Fashion-MNIST, batch 128.
TINY_EPOCHS, TINY_TRAIN, TINY_BATCH = 2, 32, 16  # 4 steps.


def recipe(arg=None, *, paper, model='resnet18', norm, lr=None,
           schedule='linear', clip='none', clip_from=5.0, dropout=False,
           epochs=90):
  """A paper row's config.

  norm: batch | weight | none. schedule: linear | step | cyclic | warmup
  (warmup takes its LRs from configs/resnet18_wn.py: pass no lr). clip: none |
  constant | log, from clip_from. paper: table, row, train_top1, val_top1 and
  optionally also.
  """
  c = default.get_config()
  c.model.update(name=model, norm=norm, dropout_rate=DROPOUT if dropout else 0.0)
  c.num_epochs = epochs
  if schedule == 'warmup':
    if lr is not None:
      raise ValueError('the warm-up rows take their LRs from configs/resnet18_wn.py')
    c.lr_schedule = resnet18_wn.get_config().lr_schedule
  elif lr is None:
    raise ValueError(f'schedule={schedule!r} needs an lr')
  else:
    c.lr_schedule.update(base_lr=lr, end_lr=0.0)
    if schedule == 'step':
      c.lr_schedule.update(name='step', step_epochs=STEP_EPOCHS, step_factor=STEP_FACTOR)
    elif schedule == 'cyclic':
      c.lr_schedule.update(name='cyclic', min_lr=lr / 10, cycle_epochs=CYCLE_HALF_EPOCHS)
    elif schedule != 'linear':
      raise ValueError(f'schedule={schedule!r} is not one of: linear, step, cyclic, warmup')
  c.grad_clip.update(mode=clip, threshold=clip_from, final_threshold=CLIP_FINAL)
  c.paper = ml_collections.ConfigDict({'also': (), **paper})
  return twin(c, arg)


def twin(c, arg):
  """c itself (arg None), or its 'small' or 'tiny' twin."""
  if arg is None:
    return c
  if arg == 'small':
    c.dataset = 'fashion_mnist'
    c.model.update(stem='small', width=16)
    c.batch_size = 128
    epochs, c.num_train_steps = SMALL_EPOCHS, SMALL_STEPS
    c.update(log_every_steps=50, eval_every_steps=-1,  # -1: once per epoch.
             histogram_every_steps=200, checkpoint_every_steps=500)
  elif arg == 'tiny':
    c.dataset = 'synthetic'
    c.synthetic.update(image_size=16, num_train=TINY_TRAIN, num_eval=TINY_BATCH)
    c.model.update(stem='small', width=8)
    c.batch_size = TINY_BATCH
    epochs, c.num_train_steps = TINY_EPOCHS, TINY_EPOCHS * TINY_TRAIN // TINY_BATCH
    c.update(log_every_steps=1, eval_every_steps=-1, histogram_every_steps=2,
             checkpoint_every_steps=2)
  else:
    raise ValueError(f"config argument {arg!r} is not one of: small, tiny (or none)")
  # The schedules' shapes over the run stay the paper's.
  scale = epochs / c.num_epochs
  c.num_epochs = epochs
  s = c.lr_schedule
  s.update(warmup_epochs=s.warmup_epochs * scale, cycle_epochs=s.cycle_epochs * scale,
           step_epochs=tuple(e * scale for e in s.step_epochs))
  return c
