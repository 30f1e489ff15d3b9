"""The optimizer of the paper, assembled from optax parts.

SGD with momentum and weight decay (on kernels only, or on every parameter as
PyTorch's SGD(model.parameters()) does); a learning-rate schedule with an
optional linear warm-up and constant hold; gradient clipping by global norm
whose threshold follows a per-epoch schedule (the paper's "adaptive
clipping"), or unit-wise adaptive gradient clipping (Brock et al. 2021).
Schedules are functions of the update count, starting at 0 for the first update.
"""

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

LR_SCHEDULES = ('constant', 'linear', 'exponential', 'step', 'cyclic', 'cosine')
CLIP_MODES = ('none', 'constant', 'log', 'log_curve', 'agc')
WEIGHT_DECAY_ON = ('kernels', 'all')


class Optimizer(NamedTuple):
  tx: optax.GradientTransformation
  learning_rate: optax.Schedule
  # None when no global-norm clipping is configured.
  clip_threshold: optax.Schedule | None
  warmup_steps: int


def _one_of(what, value, allowed):
  if value not in allowed:
    raise ValueError(f'{what}={value!r} is not one of: {", ".join(allowed)}')


def _positive(what, value):
  if not value > 0:
    raise ValueError(f'{what}={value!r} must be > 0')


def cyclic_triangular_schedule(min_lr: float, max_lr: float,
                               half_cycle_steps: int) -> optax.Schedule:
  """Smith (2015): LR climbs linearly min -> max over half a cycle, then back."""
  def schedule(count):
    x = jnp.abs(jnp.mod(count / half_cycle_steps, 2.0) - 1.0)
    return min_lr + (max_lr - min_lr) * (1.0 - x)
  return schedule


def warmup_steps(cfg, steps_per_epoch: int) -> int:
  """Steps of config.lr_schedule's linear warm-up."""
  return int(round(cfg.warmup_epochs * steps_per_epoch))


def staircase_schedule(schedule: optax.Schedule, every: int) -> optax.Schedule:
  """`schedule` held at its value at the start of each run of `every` updates."""
  return lambda count: schedule(count // every * every)


def log_curve_schedule(first: float, last: float, steps_per_epoch: int,
                       num_epochs: int) -> optax.Schedule:
  """first + a ln(1 + epoch), a such that the last epoch (num_epochs - 1) gets
  `last`; constant within an epoch, and `last` after the run."""
  a = (last - first) / math.log(num_epochs)
  def schedule(count):
    epoch = jnp.minimum(count // steps_per_epoch, num_epochs - 1)
    return first + a * jnp.log1p(epoch.astype(jnp.float32))
  return schedule


def learning_rate_schedule(cfg, steps_per_epoch: int,
                           total_steps: int) -> optax.Schedule:
  """The LR at each update count, from config.lr_schedule.

  An optional linear warm-up, then base_lr held for hold_epochs, then the named
  schedule, which spans the remaining steps; epoch numbers (step_epochs) count
  from the start of training. With staircase_epochs > 0 the named schedule
  changes only every staircase_epochs, counted from its own start.
  """
  _one_of('lr_schedule.name', cfg.name, LR_SCHEDULES)
  _positive('lr_schedule.base_lr', cfg.base_lr)
  for key in ('warmup_epochs', 'hold_epochs', 'staircase_epochs'):
    if cfg[key] < 0:
      raise ValueError(f'lr_schedule.{key}={cfg[key]!r} must be >= 0')
  warmup = warmup_steps(cfg, steps_per_epoch)
  hold_steps = int(round(cfg.hold_epochs * steps_per_epoch))
  start = warmup + hold_steps
  # A run shorter than its warm-up and hold (a smoke test of a recipe) never
  # decays: the LR rises at the recipe's rate, then holds, for the whole run.
  decay_steps = max(total_steps - start, 1)
  base = cfg.base_lr

  if cfg.name == 'constant':
    main = optax.constant_schedule(base)
  elif cfg.name == 'linear':
    main = optax.linear_schedule(base, cfg.end_lr, decay_steps)
  elif cfg.name == 'cosine':
    main = optax.cosine_decay_schedule(base, decay_steps, alpha=cfg.end_lr / base)
  elif cfg.name == 'exponential':
    main = optax.exponential_decay(base, steps_per_epoch, cfg.decay_rate,
                                   staircase=True)
  elif cfg.name == 'step':
    main = optax.piecewise_constant_schedule(
        base, {int(e * steps_per_epoch) - start: cfg.step_factor
               for e in cfg.step_epochs})
  else:  # cyclic
    if not 0 <= cfg.min_lr < base:
      raise ValueError(f'lr_schedule.min_lr={cfg.min_lr!r} must lie in [0, base_lr)')
    _positive('lr_schedule.cycle_epochs', cfg.cycle_epochs)
    main = cyclic_triangular_schedule(
        cfg.min_lr, base, max(1, int(round(cfg.cycle_epochs * steps_per_epoch))))
  if cfg.staircase_epochs > 0:
    main = staircase_schedule(main, max(1, int(round(cfg.staircase_epochs * steps_per_epoch))))

  schedules, boundaries = [], []
  if warmup:
    schedules.append(optax.linear_schedule(cfg.warmup_init_lr, base, warmup))
    boundaries.append(warmup)
  if hold_steps:
    schedules.append(optax.constant_schedule(base))
    boundaries.append(start)
  if not boundaries:
    return main
  return optax.join_schedules([*schedules, main], boundaries)


def clip_threshold_schedule(cfg, steps_per_epoch: int,
                            num_epochs: int) -> optax.Schedule | None:
  """The global-norm clipping threshold per update count, constant per epoch.

  Both shapes go from `threshold` in the first epoch to `final_threshold` in
  the last, so they can rise or fall (the paper says both), and stay there
  after the run. 'log' is log-linear, a constant factor per epoch (slow at
  first, fast at the end); 'log_curve' is threshold + a ln(1 + epoch) (fast at
  first, then nearly flat).
  """
  _one_of('grad_clip.mode', cfg.mode, CLIP_MODES)
  if cfg.mode in ('none', 'agc'):
    return None
  _positive('grad_clip.threshold', cfg.threshold)
  if cfg.mode == 'constant' or num_epochs < 2:
    return optax.constant_schedule(cfg.threshold)
  _positive('grad_clip.final_threshold', cfg.final_threshold)
  if cfg.mode == 'log_curve':
    return log_curve_schedule(cfg.threshold, cfg.final_threshold, steps_per_epoch, num_epochs)
  rate = (cfg.final_threshold / cfg.threshold) ** (1.0 / (num_epochs - 1))
  return optax.exponential_decay(cfg.threshold, steps_per_epoch, rate,
                                 staircase=True, end_value=cfg.final_threshold)


def _clipping(cfg, clip_threshold):
  if clip_threshold is not None:
    # A schedule passed straight to clip_by_global_norm fails; inject_hyperparams
    # evaluates it at the update count and keeps the value in the state.
    return optax.inject_hyperparams(optax.clip_by_global_norm)(max_norm=clip_threshold)
  if cfg.mode == 'agc':
    _positive('grad_clip.agc_clipping', cfg.agc_clipping)
    agc = optax.adaptive_grad_clip(cfg.agc_clipping, eps=cfg.agc_eps)
    # Brock et al. 2021 leave the classifier unclipped.
    return optax.masked(agc, lambda params: {k: jax.tree.map(lambda _: k != 'head', v)
                                             for k, v in params.items()})
  return optax.identity()


def momentum_sgd(learning_rate: optax.Schedule, momentum: float,
                 nesterov: bool, correction: bool) -> optax.GradientTransformation:
  """SGD with momentum, with or without momentum correction.

  Goyal et al. (2017, sec. 2.1): when the buffer holds LR-scaled updates,
  v <- m v + lr_t g, a change of LR must rescale v by lr_t / lr_{t-1}. Keeping
  the buffer free of the LR (PyTorch's and optax.sgd's form) is exactly that
  corrected update; correction=False gives the uncorrected form, whose step
  size follows an LR change only gradually.
  """
  trace = optax.trace(decay=momentum, nesterov=nesterov)
  scale = optax.scale_by_learning_rate(learning_rate)
  return optax.chain(trace, scale) if correction else optax.chain(scale, trace)


def create_optimizer(config, steps_per_epoch: int, total_steps: int,
                     weight_decay_mask: Callable,
                     learning_rate: optax.Schedule | None = None) -> Optimizer:
  """The full chain: clip raw gradients, add weight decay, momentum SGD.

  weight_decay_mask (params -> bool tree) picks the decayed leaves when
  optimizer.weight_decay_on is 'kernels'; 'all' decays every leaf.
  learning_rate, when given, replaces config.lr_schedule's schedule and its
  warm-up (bnfree_jax.lr_find's rising LR).
  """
  num_epochs = -(-total_steps // steps_per_epoch)
  if learning_rate is None:
    lr = learning_rate_schedule(config.lr_schedule, steps_per_epoch, total_steps)
    warmup = warmup_steps(config.lr_schedule, steps_per_epoch)
  else:
    lr, warmup = learning_rate, 0
  clip = clip_threshold_schedule(config.grad_clip, steps_per_epoch, num_epochs)
  opt = config.optimizer
  if not 0 <= opt.momentum < 1:
    raise ValueError(f'optimizer.momentum={opt.momentum!r} must lie in [0, 1)')
  if opt.weight_decay < 0:
    raise ValueError(f'optimizer.weight_decay={opt.weight_decay!r} must be >= 0')
  _one_of('optimizer.weight_decay_on', opt.weight_decay_on, WEIGHT_DECAY_ON)
  mask = weight_decay_mask if opt.weight_decay_on == 'kernels' else None
  tx = optax.chain(
      _clipping(config.grad_clip, clip),
      optax.add_decayed_weights(opt.weight_decay, mask=mask),
      momentum_sgd(lr, opt.momentum, opt.nesterov, opt.momentum_correction),
  )
  return Optimizer(tx, lr, clip, warmup)
