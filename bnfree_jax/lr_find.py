"""LR range test (Smith 2017, "Cyclical Learning Rates for Training Neural
Networks", sec. 3.3; fastai's lr_find): a recipe's model, data and optimizer
trained from their initialization while the LR rises exponentially, every
step's loss against its LR.

usage: python -m bnfree_jax.lr_find --config CONFIG.py[:arg] [--config.key=value ...]
           [--out DIR] [--steps 200] [--start_lr 1e-5] [--end_lr 10]

The LR goes from --start_lr to --end_lr over --steps steps, each a constant
factor above the last; everything else is the recipe's (batch, clipping and
its schedule, weight decay, momentum, dropout, label smoothing), so clipping
that holds the updates down shows as a higher LR before divergence. The loss
is smoothed as fastai does (an exponential moving average, beta 0.98, with
Adam's debiasing), and the sweep stops once the smoothed loss exceeds 4x its
lowest or a step is not finite. It prints two suggestions:
  largest   the LR of the lowest smoothed loss: beyond it the loss rises
            towards divergence, so it bounds the LRs worth training at;
  steepest  the LR where, on the way there, the smoothed loss falls fastest
            against log LR.
DIR (default lr_find) gets lr_find.png, loss against LR, and lr_find.json,
every step's LR, loss and smoothed loss with the suggestions.

Exit codes: 0 done; 2 bad input (config, data, flags), in one line before
anything is compiled; 3 the very first step is not finite (lower --start_lr).
"""

import dataclasses
import json
import math
import os
import sys

import numpy as np
from absl import flags

from bnfree_jax.main import EXIT_NONFINITE, parse_cli
from bnfree_jax.workdir import EXIT_BAD_INPUT

BETA = 0.98     # fastai's smoothing.
DIVERGED = 4.0  # Smoothed loss over this many times its lowest: stop.


def smooth(losses, beta=BETA) -> np.ndarray:
  """The debiased exponential moving average of losses at each step:
  a_i = beta a_{i-1} + (1 - beta) loss_i, a_0 = 0, reported as a_i / (1 - beta^i)."""
  average, out = 0.0, []
  for i, loss in enumerate(losses, 1):
    average = beta * average + (1 - beta) * loss
    out.append(average / (1 - beta ** i))
  return np.array(out)


def suggestions(lrs, smoothed):
  """(steepest, largest) LR, or (None, None) when the loss does not fall
  over at least two steps. largest is the LR of the lowest smoothed loss;
  steepest that of its fastest fall on the way there. The first tenth of the
  steps is left out, as fastai does: the average is still mostly its first
  losses there."""
  skip = len(lrs) // 10
  lrs, smoothed = np.asarray(lrs[skip:]), np.asarray(smoothed[skip:])
  lowest = int(np.argmin(smoothed))
  if lowest < 2:
    return None, None
  slopes = np.diff(smoothed[:lowest + 1]) / np.diff(np.log(lrs[:lowest + 1]))
  return float(lrs[np.argmin(slopes)]), float(lrs[lowest])


def _flags(fv):
  """The flags beside --config."""
  flags.DEFINE_string('out', 'lr_find', 'Directory for lr_find.png and lr_find.json.',
                      flag_values=fv)
  flags.DEFINE_integer('steps', 200, 'Steps of the sweep, at most.', flag_values=fv)
  flags.DEFINE_float('start_lr', 1e-5, 'The LR of the first step.', flag_values=fv)
  flags.DEFINE_float('end_lr', 10.0, 'The LR the last step would reach.', flag_values=fv)


def _check_flags(fv):
  """The error line for a bad flag, or None."""
  if fv['config'].present == 0:
    return '--config is required'
  if fv.steps < 10:
    return f'--steps={fv.steps} must be >= 10'
  if not 0 < fv.start_lr < fv.end_lr:
    return f'--start_lr={fv.start_lr:g} and --end_lr={fv.end_lr:g} must be 0 < start < end'
  if os.path.exists(fv.out) and not os.path.isdir(fv.out):
    return f'--out={fv.out} is a file, not a directory'
  return None


def sweep(s, steps: int):
  """(LRs, losses, the LR at which the loss diverged or None) of up to
  `steps` training steps of Setup s, whose optimizer holds the rising LR."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P

  from bnfree_jax import input_pipeline, runtime, train

  data = NamedSharding(s.mesh, P('data'))
  batches = input_pipeline.train_batches(s.config, steps_per_epoch=s.steps_per_epoch,
                                         start_step=0, local_batch_size=s.config.batch_size)
  train_fn = train.jit_train_step(s)
  state, lrs, losses = None, [], []
  for step in range(steps):
    batch = runtime.global_array(data, next(batches))
    if state is None:
      state = train.init_state(s, batch if s.config.model.wn_data_init else None)
    state, finite = train_fn(state, batch)
    lr = float(s.optimizer.learning_rate(step))
    # log_every_steps=1: the accumulators hold this step alone.
    loss = float(jax.device_get(state.train_metrics.compute()['loss']))
    if not (bool(finite) and math.isfinite(loss)):
      return lrs, losses, lr
    lrs.append(lr)
    losses.append(loss)
    smoothed = smooth(losses)
    if smoothed[-1] > DIVERGED * smoothed.min():
      return lrs, losses, lr
  return lrs, losses, None


def write_plot(path, lrs, losses, smoothed, steepest, largest, title):
  """The PNG of loss and smoothed loss against LR, the suggestions marked."""
  from matplotlib.figure import Figure
  fig = Figure(figsize=(6.4, 4.2), layout='constrained')
  ax = fig.subplots()
  ax.plot(lrs, losses, color='0.7', label='loss')
  ax.plot(lrs, smoothed, color='C0', label='smoothed')
  for lr, name, color in ((steepest, 'steepest', 'C1'), (largest, 'largest', 'C3')):
    if lr is not None:
      ax.axvline(lr, color=color, linestyle='--', label=f'{name} {lr:.2g}')
  # The divergence's losses would squash the rest of the curve.
  ax.set_ylim(min(losses) * 0.95, min(max(losses), DIVERGED * min(smoothed)) * 1.05)
  ax.set(xscale='log', xlabel='learning rate', ylabel='training loss', title=title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.savefig(path, dpi=110)


def run(argv=None) -> int:
  fv, code = parse_cli(sys.argv if argv is None else argv, _flags, _check_flags, __doc__)
  if fv is None:
    return code
  config = fv.config

  import optax

  from bnfree_jax import models, optim, runtime, train  # After the flags are fine.
  runtime.use_cpu_cores(config.batch_size, config.eval_batch_size)
  config.log_every_steps = 1  # See sweep().
  config.ema_decay = 0.0      # The average is never evaluated here.
  try:
    s = train.setup(config)
  except (ValueError, TypeError) as e:  # TypeError: a config value of the wrong type.
    print(f'error: {e}', file=sys.stderr)
    return EXIT_BAD_INPUT
  # start_lr * (end_lr / start_lr)^(step / steps); the recipe's total steps
  # keep its clipping schedule.
  ramp = optax.exponential_decay(fv.start_lr, fv.steps, fv.end_lr / fv.start_lr)
  s = dataclasses.replace(s, optimizer=optim.create_optimizer(
      config, s.steps_per_epoch, s.total_steps, models.weight_decay_mask, learning_rate=ramp))

  lrs, losses, diverged_at = sweep(s, fv.steps)
  if not lrs:
    print(f'error: the first step is not finite, at LR {fv.start_lr:g}: lower --start_lr',
          file=sys.stderr)
    return EXIT_NONFINITE
  smoothed = smooth(losses)
  steepest, largest = suggestions(lrs, smoothed)
  how = 'no divergence' if diverged_at is None else f'diverged at LR {diverged_at:.3g}'
  print(f'{len(lrs)} steps, LR {lrs[0]:.3g} -> {lrs[-1]:.3g}; {how}')
  if steepest is None:
    print('the loss did not fall for two steps before diverging: lower --start_lr')
  else:
    print(f'suggestion: steepest descent at LR {steepest:.3g}; lowest loss at LR '
          f'{largest:.3g}, the largest before divergence')
  os.makedirs(fv.out, exist_ok=True)
  title = (f'{config.model.name} ({config.model.norm}) on {config.dataset}, '
           f'batch {config.batch_size}')
  write_plot(os.path.join(fv.out, 'lr_find.png'), lrs, losses, smoothed, steepest, largest,
             title)
  with open(os.path.join(fv.out, 'lr_find.json'), 'w') as f:
    json.dump({'lr': lrs, 'loss': losses, 'smoothed': smoothed.tolist(), 'steepest': steepest,
               'largest': largest, 'diverged_at': diverged_at}, f)
  print(f'wrote {fv.out}/lr_find.png and lr_find.json')
  return 0


if __name__ == '__main__':
  sys.exit(run())
