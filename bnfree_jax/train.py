"""Training and evaluation: one jitted, data-parallel step over a mesh of all
devices of all processes. Read top to bottom: setup, steps, loop.

Sharding: the train state is replicated (P()) and every batch is split along
its first axis over the 'data' mesh axis (P('data')). XLA inserts the gradient
all-reduce and the cross-device batch statistics itself; there is no pmap and
no explicit pmean.
"""

import contextlib
import dataclasses
import functools
import logging
import math
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from bnfree_jax import (checkpointing, datasets, dp_sgd, input_pipeline, logs, metrics, models,
                        optim, privacy, runtime, workdir as workdirs)
from bnfree_jax.models import linear
from bnfree_jax.workdir import InputError, WriteError, check

COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
BN_STATS = ('global', 'per_device')


class NonFiniteError(RuntimeError):
  """The loss or gradient became NaN or infinite."""


class Diverged(NonFiniteError):
  """The train loss diverged while finite (see DivergenceWatch) and
  on_divergence='stop'; a checkpoint of that step was saved. A subclass of
  NonFiniteError: the same kind of end, the same exit code."""


class Preempted(RuntimeError):
  """SIGTERM or SIGINT arrived; a checkpoint of the current step was saved."""


class TrainState(flax.struct.PyTreeNode):
  """Everything a run needs to go on exactly, checkpointed whole: the metric
  accumulators too, so a run stopped between two log steps logs, once
  resumed, what it would have logged uninterrupted."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  skipped: jax.Array  # Steps left out because they were not finite.
  ema: Any            # {'params', 'batch_stats'} averaged; {} with ema_decay=0.
  train_metrics: metrics.TrainMetrics  # Since the last log step.
  epoch_metrics: metrics.EpochMetrics  # Since the epoch began.


# ---------------------------------------------------------------- setup ----


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything derived from the config before anything is compiled."""
  config: Any
  info: input_pipeline.DatasetInfo
  model: Any
  optimizer: optim.Optimizer
  mesh: jax.sharding.Mesh
  steps_per_epoch: int   # Full global batches per pass over the training split.
  total_steps: int
  eval_every_steps: int
  eval_batch_size: int
  # DP-SGD (config.dp.enabled): the noise multiplier sigma, given or calibrated
  # to dp.target_epsilon, and the sampling rate q; None without DP.
  noise_multiplier: float | None = None
  sampling_rate: float | None = None


def setup(config, devices=None) -> Setup:
  """Validates the config and builds model, optimizer and mesh.

  Cheap: it reads dataset metadata only, so every bad value fails here with a
  ValueError naming it, before any compilation.
  """
  for key in ('batch_size', 'log_every_steps', 'checkpoint_every_steps',
              'keep_checkpoints', 'histogram_every_steps'):
    check(isinstance(config[key], int) and config[key] > 0,
           f'{key}={config[key]!r} must be an integer > 0')
  check(config.num_train_steps > 0 or config.num_epochs > 0,
         f'num_epochs={config.num_epochs!r} must be > 0 when num_train_steps is -1')
  check(config.eval_every_steps > 0 or config.eval_every_steps == -1,
         f'eval_every_steps={config.eval_every_steps!r} must be > 0, or -1 for once per epoch')
  check(config.on_nonfinite in ('stop', 'skip'),
         f"on_nonfinite={config.on_nonfinite!r} is not one of: stop, skip")
  check(config.on_divergence in ('stop', 'ignore'),
        f"on_divergence={config.on_divergence!r} is not one of: stop, ignore")
  d = config.divergence
  check(isinstance(d.patience, int) and d.patience > 0,
        f'divergence.patience={d.patience!r} must be an integer > 0')
  check(d.loss_factor > 1, f'divergence.loss_factor={d.loss_factor!r} must be > 1')
  check(0 < d.chance_drop < 1, f'divergence.chance_drop={d.chance_drop!r} must be in (0, 1)')
  check(not config.model.wn_data_init or config.model.norm == 'weight',
         f"model.wn_data_init=True needs model.norm='weight', not {config.model.norm!r}")
  check(0 <= config.label_smoothing < 1,
        f'label_smoothing={config.label_smoothing!r} must be in [0, 1)')
  check(0 <= config.ema_decay < 1, f'ema_decay={config.ema_decay!r} must be in [0, 1) (0: off)')
  check(not config.init_from or os.path.isdir(config.init_from),
        f'init_from={config.init_from!r} is not a directory (a workdir or WORKDIR/checkpoints/STEP)')
  check(config.compute_dtype in COMPUTE_DTYPES,
         f"compute_dtype={config.compute_dtype!r} is not one of: {', '.join(COMPUTE_DTYPES)}")

  devices = devices or jax.devices()  # All devices of all processes.
  mesh = jax.make_mesh((len(devices),), ('data',), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))
  num_devices = mesh.devices.size
  eval_batch_size = config.eval_batch_size if config.eval_batch_size > 0 else config.batch_size
  for key, size in (('batch_size', config.batch_size), ('eval_batch_size', eval_batch_size)):
    check(size % num_devices == 0,
          f'{key}={size} is not divisible by the {num_devices} devices')

  info = input_pipeline.dataset_info(config)
  steps_per_epoch = info.num_train // config.batch_size
  check(steps_per_epoch > 0, f'batch_size={config.batch_size} exceeds the '
        f'{info.num_train} training examples of {info.name}')
  total_steps = (config.num_train_steps if config.num_train_steps > 0
                 else int(config.num_epochs * steps_per_epoch))
  check(config.model.bn_stats in BN_STATS,
        f"model.bn_stats={config.model.bn_stats!r} is not one of: {', '.join(BN_STATS)}")
  # Only settings that differ from the default reach the model, so that a
  # family without them (NF-ResNets) refuses them by name.
  extra = {}
  if config.model.drop_path_rate:
    extra['drop_path_rate'] = config.model.drop_path_rate
  if config.model.head_dropout_rate >= 0:
    extra['head_dropout_rate'] = config.model.head_dropout_rate
  if config.model.norm in models.GROUP_NORMS:
    extra['gn_groups'] = config.model.gn_groups
  if config.model.bn_stats == 'per_device':
    check(config.model.norm == 'batch',
          f"model.bn_stats='per_device' needs model.norm='batch', not {config.model.norm!r}")
    extra['bn_groups'] = num_devices
  model = models.create_model(
      config.model.name, num_classes=info.num_classes, norm=config.model.norm,
      width=config.model.width, dropout_rate=config.model.dropout_rate,
      stem=config.model.stem, remat=config.remat,
      dtype=COMPUTE_DTYPES[config.compute_dtype], **extra)
  optimizer = optim.create_optimizer(config, steps_per_epoch, total_steps,
                                     models.weight_decay_mask)
  # Under DP no gradient summary is written (it would publish the
  # non-private gradient), so the layer is not checked there.
  if config.histogram_layer and not config.dp.enabled:
    # Key and image made inside eval_shape: created eagerly, they would be
    # computations compiled and run before the config is fully checked.
    params = jax.eval_shape(lambda: model.init(
        jax.random.key(0), jnp.zeros((1, *info.image_shape)), train=False))['params']
    layers = metrics.layer_names(params)
    check(config.histogram_layer in layers,
          f'histogram_layer={config.histogram_layer!r} is not a layer of {config.model.name}; '
          f"e.g. {', '.join(layers[:3])}, ... ('' for none)")
  eval_every = config.eval_every_steps if config.eval_every_steps > 0 else steps_per_epoch
  dp = _check_dp(config, info, num_devices, total_steps) if config.dp.enabled else {}
  return Setup(config, info, model, optimizer, mesh, steps_per_epoch,
               total_steps, eval_every, eval_batch_size, **dp)


def _check_dp(config, info, num_devices: int, total_steps: int) -> dict:
  """Refuses what would break the privacy of DP-SGD, and settles its noise."""
  dp = config.dp
  check(config.model.norm != 'batch',
        "dp.enabled=True with model.norm='batch': batch norm mixes the examples of a batch, "
        "so an example's gradient is not its own and clipping it bounds nothing; use "
        f"model.norm in {[n for n in models.NORMS if n != 'batch']} or an nf_* model")
  check(not config.model.wn_data_init,
        'dp.enabled=True with model.wn_data_init=True: that init reads training examples '
        'outside the private mechanism; set it False')
  check(config.dataset != 'imagenet2012',
        'dp.enabled=True needs a dataset held in memory (Poisson sampling may pick any '
        'example at any step), not imagenet2012')
  # The DP input feeds the examples as stored; a resized eval split would test
  # a network at a size it never trained at.
  check(datasets.image_size(config) == datasets.native_size(config),
        f'dp.enabled=True trains on the images as stored ({datasets.native_size(config)} '
        f'pixels): image_size={config.image_size} is not supported with DP; leave it -1')
  check(dp.sampling in privacy.SAMPLINGS,
        f"dp.sampling={dp.sampling!r} is not one of: {', '.join(privacy.SAMPLINGS)}")
  check(dp.accountant in privacy.ACCOUNTANTS,
        f"dp.accountant={dp.accountant!r} is not one of: {', '.join(privacy.ACCOUNTANTS)}")
  check(dp.l2_clip > 0, f'dp.l2_clip={dp.l2_clip!r} must be > 0')
  check(0 < dp.delta < 1, f'dp.delta={dp.delta!r} must be in (0, 1)')
  check((dp.noise_multiplier >= 0) != (dp.target_epsilon > 0),
        f'set exactly one of dp.noise_multiplier (>= 0, now {dp.noise_multiplier!r}) and '
        f'dp.target_epsilon (> 0, now {dp.target_epsilon!r}); -1 leaves one unset')
  check(isinstance(dp.microbatch_size, int) and dp.microbatch_size > 0
        and dp.microbatch_size % num_devices == 0,
        f'dp.microbatch_size={dp.microbatch_size!r} must be a positive multiple of the '
        f'{num_devices} devices')
  check(isinstance(dp.augmult, int) and dp.augmult >= 0,
        f'dp.augmult={dp.augmult!r} must be an integer >= 0 (0: no augmentation)')
  check(dp.feature_mean_noise == -1 or dp.feature_mean_noise > 0,
        f'dp.feature_mean_noise={dp.feature_mean_noise!r} must be > 0, or -1 for off')
  check(dp.feature_mean_noise == -1 or config.model.name == 'linear',
        f'dp.feature_mean_noise={dp.feature_mean_noise!r} needs model.name=\'linear\' (the '
        f'model that centers its features on the released mean), not {config.model.name!r}')
  q = config.batch_size / info.num_train
  try:
    sigma = (dp.noise_multiplier if dp.noise_multiplier >= 0 else
             privacy.calibrate_noise(dp.target_epsilon, dp.delta, q, total_steps, dp.accountant,
                                     _mean_noise(config)))
  except ValueError as e:
    raise InputError(str(e)) from e
  return {'noise_multiplier': sigma, 'sampling_rate': q}


# ---------------------------------------------------------------- steps ----


def init_state(s: Setup, batch=None) -> TrainState:
  """Parameters and optimizer state, created replicated on the mesh. With a
  batch and config.model.wn_data_init, WNConv layers get the data-dependent
  initialization of Salimans & Kingma (2016) from it."""
  replicated = NamedSharding(s.mesh, P())
  # XLA's RngBitGenerator compiles in a fraction of threefry's time for the
  # many initializers; init runs replicated, so sharding cannot change it.
  key = jax.random.key(s.config.seed, impl='rbg')
  image = jnp.zeros((1, *s.info.image_shape), jnp.float32)

  @functools.partial(jax.jit, out_shardings=replicated)
  def init(batch):
    variables = s.model.init({'params': key, 'dropout': key}, image, train=False)
    if batch is not None:
      variables = models.data_dependent_init(s.model, variables, batch['image'])
    return new_state(s, variables['params'], variables.get('batch_stats', {}))
  return init(batch)


def new_state(s: Setup, params, batch_stats) -> TrainState:
  """The state at step 0 of a run starting from these variables."""
  ema = {'params': params, 'batch_stats': batch_stats} if s.config.ema_decay > 0 else {}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state=s.optimizer.tx.init(params), skipped=jnp.zeros((), jnp.int32),
                    ema=ema, train_metrics=metrics.TrainMetrics.empty(),
                    epoch_metrics=metrics.EpochMetrics.empty())


def _loss_and_grads(model, state, batch, dropout_key, label_smoothing):
  def loss_fn(params):
    logits, updated = model.apply(
        {'params': params, 'batch_stats': state.batch_stats}, batch['image'],
        train=True, rngs={'dropout': dropout_key}, mutable=['batch_stats'])
    per_example = metrics.per_example(logits, batch['label'], label_smoothing)
    return per_example['loss'].mean(), (per_example, updated.get('batch_stats', {}))
  return jax.value_and_grad(loss_fn, has_aux=True)(state.params)


# Tags of the per-step random streams, each a function of (seed, step) alone.
_DROPOUT, _DP_NOISE, _DP_AUGMENT, _DP_FEATURE_MEAN = 1, 2, 3, 4


def _step_key(config, stream: int, step):
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), stream), step)


def _dropout_key(config, step):
  return _step_key(config, _DROPOUT, step)


def train_step(state: TrainState, batch, *, s: Setup):
  """One SGD step on a global batch: (state, batch) -> (state, finite). The
  step's metrics are merged into the state's accumulators."""
  (_, (per_example, batch_stats)), grads = _loss_and_grads(
      s.model, state, batch, _dropout_key(s.config, state.step), s.config.label_smoothing)
  grad_norm = optax.tree.norm(grads)  # Before clipping.
  finite = jnp.isfinite(per_example['loss']).all() & jnp.isfinite(grad_norm)
  threshold = (s.optimizer.clip_threshold(state.step)
               if s.optimizer.clip_threshold else jnp.inf)
  return _update(
      s, state, grads, finite, batch_stats,
      lambda new: metrics.TrainMetrics.single_from_model_output(
          **per_example, grad_norm=grad_norm, clipped=(grad_norm > threshold).astype(jnp.float32),
          **_step_outputs(s, state, new, threshold, finite)),
      metrics.EpochMetrics.single_from_model_output(**per_example, finite=finite)), finite


def _step_outputs(s: Setup, state, new, threshold, finite) -> dict:
  """The train metrics' outputs that are one value per step."""
  return dict(learning_rate=s.optimizer.learning_rate(state.step),
              clip_threshold=jnp.asarray(threshold, jnp.float32),
              param_norm=optax.tree.norm(new.params),
              skipped_steps=new.skipped.astype(jnp.float32), finite=finite)


def _update(s: Setup, state, grads, finite, batch_stats, step_metrics, epoch_metrics):
  """The state after the optimizer's update with `grads` where finite (see
  apply_if_finite), with the step's metrics accumulated: step_metrics(new
  state) and epoch_metrics."""
  params, opt_state = apply_if_finite(s.optimizer.tx, grads, finite, state.params,
                                      state.opt_state)
  new = state.replace(
      step=state.step + 1, params=params, opt_state=opt_state,
      batch_stats=jax.tree.map(lambda n, o: jnp.where(finite, n, o), batch_stats,
                               state.batch_stats),
      skipped=state.skipped + (~finite).astype(jnp.int32))
  new = new.replace(ema=_ema_update(s.config, state.step, state.ema,
                                    {'params': new.params, 'batch_stats': new.batch_stats}))
  return new.replace(
      train_metrics=_accumulate(state.train_metrics, step_metrics(new),
                                fresh=state.step % s.config.log_every_steps == 0),
      epoch_metrics=_accumulate(state.epoch_metrics, epoch_metrics,
                                fresh=state.step % s.steps_per_epoch == 0))


# DP-SGD's step: dp_accumulate (dp_sums of each device's rows) over the
# step's micro-batches, then dp_apply.
# Per-example sums of the micro-batches: the clipped gradients ('grads') and
# the metrics' totals over `count` real (unmasked) examples.
_DP_SUMS = ('loss', 'top1', 'top5', 'grad_norm', 'clipped')


def dp_zeros(params) -> dict:
  return {'grads': jax.tree.map(jnp.zeros_like, params), 'count': jnp.zeros((), jnp.int32),
          **{k: jnp.zeros((), jnp.float32) for k in _DP_SUMS}}


def dp_sums(state: TrainState, batch, *, s: Setup) -> dict:
  """The sums of one micro-batch: each real example's gradient clipped to
  dp.l2_clip (with dp.augmult > 0 the gradient of its mean loss over that
  many augmented copies), and its metrics. Its random streams (dropout,
  augmentation) are keyed by (seed, step, the example's index), so the same
  step gives the same sums however the examples are split over micro-batches
  and devices."""
  c = s.config
  dropout_key = _dropout_key(c, state.step)
  augment_key = _step_key(c, _DP_AUGMENT, state.step)

  def example_grad(params, example):
    image, index = example['image'], example['index']
    images = (image[None] if c.dp.augmult == 0 else
              dp_sgd.augment(image, jax.random.fold_in(augment_key, index), c.dp.augmult))

    def loss_fn(params):
      logits = s.model.apply({'params': params, 'batch_stats': state.batch_stats}, images,
                             train=True, rngs={'dropout': jax.random.fold_in(dropout_key, index)})
      per_example = metrics.per_example(
          logits, jnp.broadcast_to(example['label'], images.shape[:1]), c.label_smoothing)
      return per_example['loss'].mean(), {k: v.mean() for k, v in per_example.items()}
    return jax.grad(loss_fn, has_aux=True)(params)

  mask = batch['mask']
  grads, per_example, norms = dp_sgd.clipped_sum(
      example_grad, state.params, {k: batch[k] for k in ('image', 'label', 'index')}, mask,
      c.dp.l2_clip)
  per_example.update(grad_norm=norms, clipped=(norms > c.dp.l2_clip).astype(jnp.float32))
  new = {k: jnp.sum(jnp.where(mask, per_example[k], 0.0)) for k in _DP_SUMS}
  new.update(grads=grads, count=jnp.sum(mask, dtype=jnp.int32))
  return new


def dp_accumulate(s: Setup):
  """(state, sums, micro-batch) -> sums plus the micro-batch's, each device
  summing its own rows (shard_map), then one all-reduce. Not left to XLA's
  partitioner: on a batch sharded over devices it computes the vmapped
  per-example filter gradients of the rows past the first device as zeros
  (jax 0.10.2, CPU; tests/test_dp_sgd.py compares 1, 2 and 4 devices)."""
  def accumulate(state, sums, batch):
    # Each device differentiates its own copy of the parameters: the gradient
    # of a replicated input would be summed over the devices, per example.
    state = state.replace(params=jax.lax.pcast(state.params, 'data', to='varying'))
    return jax.tree.map(jnp.add, sums, jax.lax.psum(dp_sums(state, batch, s=s), 'data'))
  return jax.shard_map(accumulate, mesh=s.mesh, in_specs=(P(), P(), P('data')), out_specs=P())


def dp_apply(state: TrainState, sums: dict, *, s: Setup):
  """The DP-SGD update from a step's sums: one Gaussian draw of std
  noise_multiplier * l2_clip (keyed by (seed, step)) added to the summed
  clipped gradients, divided by the expected batch size, then the optimizer.
  (state, sums) -> (state, finite); train/grad_norm is then the mean
  per-example norm before clipping, train/clipped_fraction the fraction of
  examples clipped."""
  c = s.config
  noise = dp_sgd.gaussian_noise(_step_key(c, _DP_NOISE, state.step), sums['grads'],
                                s.noise_multiplier * c.dp.l2_clip)
  grads = jax.tree.map(lambda g, n: (g + n) / c.batch_size, sums['grads'], noise)
  finite = jnp.isfinite(sums['loss']) & jnp.isfinite(optax.tree.norm(grads))
  totals = {k: sums[k] for k in _DP_SUMS}
  zeros = {k: jnp.zeros(()) for k in _DP_SUMS}  # Outputs whose totals come from sums.
  return _update(
      s, state, grads, finite, state.batch_stats,
      lambda new: metrics.with_example_totals(
          metrics.TrainMetrics.single_from_model_output(
              **zeros, **_step_outputs(s, state, new, c.dp.l2_clip, finite)),
          totals, sums['count'], finite),
      metrics.with_example_totals(
          metrics.EpochMetrics.single_from_model_output(**zeros, finite=finite),
          totals, sums['count'], finite)), finite


def _accumulate(total, step_metrics, fresh):
  """total merged with this step's metrics, or these alone when the step
  begins a log interval or an epoch: the loop logs the totals after the
  interval's last step and the next step starts anew, whether or not the run
  was stopped and resumed in between."""
  return jax.tree.map(lambda m, n: jnp.where(fresh, n, m), total.merge(step_metrics),
                      step_metrics)


def _ema_update(config, step, ema, new):
  """ema <- d * ema + (1 - d) * new, with d = ema_decay, or during the
  warm-up min(ema_decay, (1 + step) / (10 + step)) so that the first steps'
  random weights fade fast. After a skipped step new is the old state, so
  the average moves towards values it already holds."""
  if not ema:
    return ema
  decay = jnp.asarray(config.ema_decay, jnp.float32)
  if config.ema_warmup:
    decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return jax.tree.map(lambda e, n: (decay * e + (1 - decay) * n).astype(e.dtype), ema, new)


def apply_if_finite(tx, grads, finite, params, opt_state):
  """(params, opt_state) after tx's update where finite; else the old ones
  (parameters and momentum untouched) except optax's update counters, which
  advance, so the LR and clip threshold stay functions of state.step on
  skipped steps too. A non-finite update is never applied, whatever
  config.on_nonfinite says: 'skip' goes on without it and 'stop' ends the run
  holding the last finite state. Both modes thus share one compiled program."""
  updates, new_opt_state = tx.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)

  def pick(path, n, o):
    is_count = path and getattr(path[-1], 'name', None) == 'count'
    return n if is_count else jnp.where(finite, n, o)
  return (jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_params, params),
          jax.tree.map_with_path(pick, new_opt_state, opt_state))


def jit_train_step(s: Setup):
  """The compiled train step the loop runs (and the bench measures):
  (state, batch) -> (state, finite). The state is donated, so its buffers are
  reused for the new state.

  With DP-SGD the batch is the step's list of micro-batches, whose number
  varies with the Poisson sample: one compiled program accumulates each
  micro-batch and another applies the step's noisy update, so no batch size
  is ever recompiled for, truncated or dropped, and memory stays that of one
  micro-batch.
  """
  replicated, data = NamedSharding(s.mesh, P()), NamedSharding(s.mesh, P('data'))
  if not s.config.dp.enabled:
    return jax.jit(functools.partial(train_step, s=s), donate_argnums=0,
                   in_shardings=(replicated, data), out_shardings=replicated)
  zeros = jax.jit(dp_zeros, out_shardings=replicated)
  accumulate = jax.jit(dp_accumulate(s), donate_argnums=1,
                       in_shardings=(replicated, replicated, data), out_shardings=replicated)
  apply = jax.jit(functools.partial(dp_apply, s=s), donate_argnums=0,
                  in_shardings=(replicated, replicated), out_shardings=replicated)

  def dp_step(state, microbatches):
    sums = zeros(state.params)
    for batch in microbatches:
      sums = accumulate(state, sums, batch)
      # One micro-batch in flight, as evaluate keeps one batch: with a
      # step's dozens of launches queued at once, 2 CPU devices deadlocked
      # in the all-reduce, one device's part waiting for its peer's, which
      # never ran (every other worker thread waited for a launch slot).
      jax.block_until_ready(sums)
    return apply(state, sums)
  return dp_step


def gradient_summaries(state: TrainState, batch, *, s: Setup):
  """Per-layer gradient norms and per-stage (and config.histogram_layer's)
  log-magnitude samples of the gradient the train step at this state and
  batch will take."""
  _, grads = _loss_and_grads(s.model, state, batch, _dropout_key(s.config, state.step),
                             s.config.label_smoothing)
  return (metrics.layer_grad_norms(grads),
          metrics.grad_magnitude_samples(grads, s.config.histogram_layer))


def eval_step(variables, batch, *, s: Setup):
  """Metrics of the model with `variables` ({'params', 'batch_stats'}) on a
  padded eval batch; the padding counts for nothing."""
  logits = s.model.apply(variables, batch['image'], train=False)
  return metrics.EvalMetrics.single_from_model_output(
      **metrics.per_example(logits, batch['label']), mask=batch['mask'])


# ----------------------------------------------------------------- loop ----


def train_and_evaluate(run, workdir: str, devices=None,
                       stop: runtime.StopSignals | None = None) -> dict:
  """Trains (or, with config.eval_only, evaluates) the run in workdir,
  resuming from its newest readable checkpoint. Returns the last eval metrics.

  run: a config, or the Setup that setup(config) made of it (main.py passes
  its own, so the config is checked once). devices: the mesh's devices
  (default all of all processes); used with a config only.
  stop: the flag of a caller that took SIGTERM/SIGINT over earlier (main.py,
  from its start); by default this call takes them over itself.

  Raises InputError for a bad config, data or workdir; NonFiniteError when
  on_nonfinite='stop' meets a non-finite step, and its subclass Diverged when
  on_divergence='stop' sees the loss diverge; WriteError when a checkpoint or
  the event log cannot be written; Preempted after SIGTERM/SIGINT,
  once a checkpoint of the current step is saved. A signal while the state is
  restored or the programs compile ends the run at the first step boundary.
  """
  s = run if isinstance(run, Setup) else setup(run, devices)
  with runtime.StopSignals() if stop is None else contextlib.nullcontext(stop) as stop:
    return _train_and_evaluate(s, workdir, stop)


def evaluate(s: Setup, variables, eval_fn, prefix: str = logs.EVAL) -> dict:
  """Loss, top-1 and top-5 of the model with `variables` over the whole eval
  split, each example once."""
  data = NamedSharding(s.mesh, P('data'))
  total = None
  for local in input_pipeline.eval_batches(
      s.config, local_batch_size=s.eval_batch_size // jax.process_count(),
      process_index=jax.process_index(), process_count=jax.process_count()):
    batch_metrics = eval_fn(variables, runtime.global_array(data, local))
    total = batch_metrics if total is None else total.merge(batch_metrics)
    # One batch in flight: with every batch queued at once (the numpy input
    # is instant), CPU devices of one process deadlocked in the eval's
    # all-reduce, one device's queue full of launches waiting on the other.
    jax.block_until_ready(total)
  return {logs.tag(prefix, k): float(v) for k, v in total.compute().items()}


def _evaluate_and_log(s: Setup, state, eval_fn, writer, step: int) -> dict:
  """Evaluates the parameters, and their moving average where kept."""
  t0 = time.perf_counter()
  runs = [(logs.EVAL, {'params': state.params, 'batch_stats': state.batch_stats})]
  if state.ema:
    runs.append((logs.EVAL_EMA, state.ema))
  results = {}
  for prefix, variables in runs:
    values = evaluate(s, variables, eval_fn, prefix)
    _log('step %d  %s loss %.4f  top1 %.2f%%  top5 %.2f%%', step, prefix,
         *(values[logs.tag(prefix, k)] * (1 if k == 'loss' else 100)
           for k in ('loss', 'top1', 'top5')))
    results.update(values)
  writer.write_scalars(step, {**results, logs.EVAL_SECONDS: time.perf_counter() - t0})
  return results


def _log_train(s: Setup, writer, step: int, state, train_seconds: float, steps: int) -> dict:
  """Writes, prints and returns the averages of the last `steps` steps, which
  took train_seconds (evaluations excluded)."""
  values = {logs.tag(logs.TRAIN, k): float(v)
            for k, v in state.train_metrics.compute().items()}
  if s.optimizer.clip_threshold is None and not s.config.dp.enabled:
    del values['train/clip_threshold'], values['train/clipped_fraction']
  if s.config.dp.enabled:
    values.update({logs.EPSILON: dp_epsilon(s, step), logs.NOISE_MULTIPLIER: s.noise_multiplier})
  images_per_sec = steps * s.config.batch_size / train_seconds
  values.update({logs.EPOCH: step / s.steps_per_epoch,
                 logs.STEPS_PER_SEC: steps / train_seconds,
                 logs.IMAGES_PER_SEC: images_per_sec,
                 logs.SECONDS_PER_EPOCH: s.steps_per_epoch * train_seconds / steps,
                 logs.PEAK_MEMORY_GB: runtime.peak_memory_gb()})
  writer.write_scalars(step, values)
  _log('step %d/%d  epoch %.2f  loss %.4f  top1 %.2f%%  %.1f img/s  ETA %s',
       step, s.total_steps, values[logs.EPOCH], values['train/loss'],
       100 * values['train/top1'], images_per_sec,
       logs.format_duration((s.total_steps - step) * train_seconds / steps))
  return values


def dp_epsilon(s: Setup, steps: int) -> float:
  """The epsilon (at dp.delta) spent by `steps` DP-SGD steps of this run (and
  its released feature mean)."""
  dp = s.config.dp
  return privacy.epsilon(s.sampling_rate, s.noise_multiplier, steps, dp.delta, dp.accountant,
                         _mean_noise(s.config))


def _mean_noise(config) -> float:
  """The feature mean's noise multiplier; 0 where none is released."""
  return max(config.dp.feature_mean_noise, 0.0)


def release_feature_mean(s: Setup, state: TrainState) -> TrainState:
  """`state` at step 0 with the linear model's feature_mean: the mean of the
  training split's features, released once by the Gaussian mechanism
  (centering them cuts what DP-SGD's clip and noise cost a linear model).

  Each example's features are clipped to norm R = sqrt(D), their bound
  (linear.features), so that the bound holds as a fact, not an assumption:
  adding or removing an example moves their sum by at most R. The sum gets
  one draw of N(0, (dp.feature_mean_noise R)^2) per coordinate, keyed by the
  seed alone, and is divided by the split's size, public as the sampling
  rate takes it to be. privacy.dp_event composes this release with the
  steps'. Every process computes the same mean from the whole split."""
  c = s.config
  features = functools.partial(linear.features, stem=c.model.stem)
  d = jax.eval_shape(features, jax.ShapeDtypeStruct((1, *s.info.image_shape), jnp.float32)).shape[1]
  bound = math.sqrt(d)

  @jax.jit
  def clipped_sum(images, mask):
    x = features(images)
    x = x * dp_sgd.clip_scale(jnp.linalg.norm(x, axis=1, keepdims=True), bound)
    return jnp.sum(jnp.where(mask[:, None], x, 0.0), axis=0)

  total = np.zeros(d, np.float64)
  for batch in input_pipeline.train_split_batches(c, batch_size=c.dp.microbatch_size):
    total += np.asarray(clipped_sum(batch['image'], batch['mask']), np.float64)
  noise = jax.random.normal(_step_key(c, _DP_FEATURE_MEAN, 0), (d,), jnp.float32)
  mean = (total + np.float64(noise) * c.dp.feature_mean_noise * bound) / s.info.num_train
  stats = {**state.batch_stats, 'feature_mean': jnp.asarray(mean, jnp.float32)}
  return jax.jit(functools.partial(new_state, s),
                 out_shardings=NamedSharding(s.mesh, P()))(state.params, stats)


def _log_dp(s: Setup):
  dp = s.config.dp
  sigma = (f'{s.noise_multiplier:.4f} (calibrated to epsilon {dp.target_epsilon})'
           if dp.target_epsilon > 0 else f'{s.noise_multiplier:.4f}')
  _log('DP-SGD: %s sampling, q=%.6f (expected batch %d of %d), micro-batches of %d, '
       'l2_clip %g, noise multiplier %s, augmult %d%s; epsilon after the %d planned steps: '
       '%.3f at delta=%g (%s).', dp.sampling, s.sampling_rate, s.config.batch_size,
       s.info.num_train, dp.microbatch_size, dp.l2_clip, sigma, dp.augmult,
       (f', feature mean released with noise multiplier {dp.feature_mean_noise:g}'
        if dp.feature_mean_noise > 0 else ''),
       s.total_steps, dp_epsilon(s, s.total_steps), dp.delta, dp.accountant)
  if dp.sampling == 'shuffle':
    _log("DP-SGD: dp.sampling='shuffle' takes fixed-size batches of a shuffled epoch; the "
         'epsilon logged assumes Poisson sampling and is not a proven guarantee for it.')


def _log_epoch(writer, step: int, state):
  """Writes the averages over the epoch that ends at `step`."""
  writer.write_scalars(step, {logs.tag(logs.TRAIN_EPOCH, k): float(v)
                              for k, v in state.epoch_metrics.compute().items()})


def _log(message, *args):
  if jax.process_index() == 0:
    logging.info(message, *args)


def _ensure_finite(step: int, finite, last_saved: int | None, directory):
  """Raises NonFiniteError if the step `step` was not finite."""
  if not bool(finite):
    where = (f'step {last_saved} in {directory}' if last_saved is not None
             else 'none (no checkpoint was written yet)')
    raise NonFiniteError(
        f'loss or gradient is not finite at step {step}; last good checkpoint: '
        f'{where}. Lower lr_schedule.base_lr, enable grad_clip, or set '
        "on_nonfinite='skip'.")


@dataclasses.dataclass
class DivergenceWatch:
  """Tells from the train loss of each log step when a run has diverged
  without going non-finite (fallen back to chance, say): after `patience`
  consecutive log intervals ending after the LR warm-up, each with a loss
  - at or above chance, ln of the class count (what uniform predictions
    score whatever the label smoothing, which only lifts the floor below
    it), once the best logged loss was a fraction chance_drop below chance:
    a run still at chance has not started yet, it has not diverged (several
    :lowdata rows sit there for 5-7 of their 20 epochs,
    results/paper_lowdata/loss.png), or
  - above loss_factor times the best logged loss.
  Its state is a function of the logged losses, which the event files hold
  up to every checkpoint: a resumed run replays them (watch_divergence).
  """
  num_classes: int
  warmup_steps: int
  patience: int
  loss_factor: float
  chance_drop: float
  best: float = float('inf')
  count: int = 0

  def update(self, step: int, loss: float) -> str | None:
    """Takes the loss logged at step; returns what diverged ('at or above
    chance ...'), once it has for `patience` intervals, else None."""
    chance = math.log(self.num_classes)
    at_chance = loss >= chance and self.best <= (1 - self.chance_drop) * chance
    above_best = loss > self.loss_factor * self.best
    self.best = min(self.best, loss)
    self.count = self.count + 1 if step > self.warmup_steps and (at_chance or above_best) else 0
    if self.count < self.patience:
      return None
    return (f'at or above chance (ln {self.num_classes} = {chance:.4f})' if at_chance
            else f'above {self.loss_factor:g} x its best')


def watch_divergence(s: Setup, workdir: str, start: int) -> DivergenceWatch:
  """A DivergenceWatch that has seen the train losses workdir's event files
  hold up to step start."""
  d = s.config.divergence
  watch = DivergenceWatch(s.info.num_classes, s.optimizer.warmup_steps,
                          d.patience, d.loss_factor, d.chance_drop)
  for step, loss in logs.read_scalars(workdir, logs.tag(logs.TRAIN, 'loss')):
    if step <= start:
      watch.update(step, loss)
  return watch


@contextlib.contextmanager
def _completing(mngr, writer, workdir: str):
  """However the run ends, the checkpoint save in flight completes and the
  metrics reach disk: an error message naming that checkpoint is true, and
  a rerun resumes from it.

  A checkpoint or event that cannot be written ends the run with a
  WriteError that says what failed (a full disk may fail both: the event log
  first, as orbax reports a failed save only at the next save or wait) and
  names the newest complete checkpoint, read from disk once nothing is in
  flight, since the step last saved may be the one that failed. It replaces
  any other outcome, whose message may claim a save that failed.
  """
  errors = []
  try:
    yield
  except WriteError as e:
    errors.append(e)
  finally:
    for finish in (functools.partial(checkpointing.wait, mngr), writer.close):
      try:
        finish()
      except WriteError as e:
        errors.append(e)
    if errors:
      newest = workdirs.latest_checkpoint_step(workdir)
      # Once: closing the event log fails again as writing it did.
      raise WriteError('; '.join(dict.fromkeys(map(str, errors)))
                       + '; the newest complete checkpoint: '
                       + (f'step {newest} in {mngr.directory}, which a rerun resumes'
                          if newest is not None else 'none')) from errors[0]


def _train_and_evaluate(s: Setup, workdir: str, stop: runtime.StopSignals) -> dict:
  config = s.config
  workdirs.prepare_workdir(config, workdir)
  replicated, data = NamedSharding(s.mesh, P()), NamedSharding(s.mesh, P('data'))
  train_fn = jit_train_step(s)
  eval_fn = jax.jit(functools.partial(eval_step, s=s), out_shardings=replicated)
  summaries_fn = jax.jit(functools.partial(gradient_summaries, s=s),
                         out_shardings=replicated)
  shard = dict(process_index=jax.process_index(), process_count=jax.process_count())
  train_batches = (
      functools.partial(input_pipeline.dp_train_batches, config, **shard) if config.dp.enabled
      else functools.partial(input_pipeline.train_batches, config,
                             steps_per_epoch=s.steps_per_epoch,
                             local_batch_size=config.batch_size // jax.process_count(), **shard))

  # ----- State: the newest readable checkpoint, else a fresh initialization.
  # The manager's start is the first collective of the run.
  runtime.wait_for_all_processes('start')
  mngr = checkpointing.manager(workdir, keep=config.keep_checkpoints)
  abstract = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
      jax.eval_shape(lambda: init_state(s)))
  try:
    state = checkpointing.restore_latest(mngr, abstract)
  except checkpointing.NoReadableCheckpointError as e:
    raise InputError(str(e)) from e
  if state is None and config.eval_only:
    raise InputError(f'workdir {workdir} has no checkpoint to evaluate')
  writer = logs.Writer(workdir, enabled=jax.process_index() == 0)

  with _completing(mngr, writer, workdir):
    if state is not None and (config.eval_only or int(state.step) >= s.total_steps):
      return _evaluate_and_log(s, state, eval_fn, writer, int(state.step))
    if state is None:
      first = (runtime.global_array(data, next(train_batches(start_step=0)))
               if config.model.wn_data_init else None)
      state = init_state(s, first)
      if config.init_from:
        state = _start_from(s, state, config.init_from)
      if config.dp.enabled and config.dp.feature_mean_noise > 0:
        state = release_feature_mean(s, state)
    elif config.init_from:
      _log('init_from=%s ignored: the run resumes from its own checkpoint.', config.init_from)
    start = int(state.step)
    _log('Training %s (norm=%s) on %s: steps %d..%d of %d, %d steps/epoch, '
         'global batch %d over %d devices.', config.model.name, config.model.norm,
         s.info.name, start, s.total_steps, s.total_steps, s.steps_per_epoch,
         config.batch_size, s.mesh.devices.size)
    if config.dp.enabled:
      _log_dp(s)
    if s.optimizer.warmup_steps >= s.total_steps:
      _log('The LR warm-up (%d steps) outlasts the run: the LR rises for all of it.',
           s.optimizer.warmup_steps)

    # ----- Loop. With on_nonfinite='stop', nothing is logged or saved past a
    # non-finite step; its flag is read one step late (except before any of
    # those) to keep one step in flight on the device.
    check_finite = config.on_nonfinite == 'stop'
    watch = watch_divergence(s, workdir, start) if config.on_divergence == 'stop' else None
    results, previous, diverged = {}, None, None
    last_saved, interval_start, interval_t0 = mngr.latest_step(), start, time.perf_counter()
    batches = train_batches(start_step=start)
    for step in range(start, s.total_steps):
      batch = runtime.global_array(data, next(batches))
      # Under DP the gradient summaries would publish the non-private gradient.
      if not config.dp.enabled and step % config.histogram_every_steps == 0:
        norms, samples = summaries_fn(state, batch)
        writer.write_scalars(step, {logs.tag(logs.LAYER_GRAD_NORM, k): v
                                    for k, v in norms.items()})
        writer.write_histograms(step, {logs.tag(logs.GRAD_HISTOGRAM, k): v
                                       for k, v in samples.items()})
      state, finite = train_fn(state, batch)
      if previous is not None:
        # Waiting for the previous step keeps one step in flight: a bounded
        # queue per device (see evaluate), whatever on_nonfinite says.
        jax.block_until_ready(previous[1])
        if check_finite:
          _ensure_finite(*previous, last_saved, mngr.directory)
      previous = (step, finite)

      done = step + 1
      last = done == s.total_steps
      log_now = done % config.log_every_steps == 0 or last
      epoch_done = done % s.steps_per_epoch == 0
      eval_now = done % s.eval_every_steps == 0 or last
      if check_finite and (log_now or epoch_done or eval_now):
        _ensure_finite(step, finite, last_saved, mngr.directory)
      if log_now:
        values = _log_train(s, writer, done, state, time.perf_counter() - interval_t0,
                            done - interval_start)
        interval_start, interval_t0 = done, time.perf_counter()
        loss = values[logs.tag(logs.TRAIN, 'loss')]
        seen = watch and watch.update(done, loss)
        if seen:
          diverged = (f'train loss {seen} for {watch.patience} log intervals: {loss:.4f} at '
                      f'step {done}, best logged {watch.best:.4f}, LR '
                      f"{values[logs.tag(logs.TRAIN, 'learning_rate')]:.4g}")
      if epoch_done:
        _log_epoch(writer, done, state)
      if eval_now:
        t0 = time.perf_counter()
        results = _evaluate_and_log(s, state, eval_fn, writer, done)
        interval_t0 += time.perf_counter() - t0  # Rates and ETA count training only.
      # Asked after the eval, so a signal during it saves this very step.
      preempted = stop.requested()
      save_now = done % config.checkpoint_every_steps == 0 or last or preempted or diverged
      if save_now:
        if check_finite:
          _ensure_finite(step, finite, last_saved, mngr.directory)
        checkpointing.save(mngr, done, state)
        last_saved = done
      if diverged:
        raise Diverged(f'{diverged}; saved a checkpoint at step {done} in {mngr.directory}. '
                       'Lower lr_schedule.base_lr or enable grad_clip; '
                       "on_divergence='ignore' trains on.")
      if preempted and not last:  # After the last step there is nothing to resume.
        raise Preempted(f'{stop.received or "a stop signal"} received: saved a '
                        f'checkpoint at step {done} in {mngr.directory}')
  return results


def _start_from(s: Setup, state: TrainState, source: str) -> TrainState:
  """A fresh state whose parameters and BN statistics come from the newest
  checkpoint of workdir `source` (or checkpoint directory source/STEP),
  except a head whose class count differs, which keeps its fresh values."""
  try:
    step, saved = checkpointing.read_variables(source)
  except ValueError as e:
    raise InputError(f'init_from: {e}') from e
  loaded, new, variables = [], [], {}
  for collection in ('params', 'batch_stats'):
    fresh = flax.traverse_util.flatten_dict(getattr(state, collection), sep='/')
    given = flax.traverse_util.flatten_dict(saved.get(collection, {}), sep='/')
    extra = sorted(set(given) - set(fresh))
    if extra:
      raise InputError(f'init_from={source}: {collection} {extra[0]} {given[extra[0]].shape} is '
                       f'not in {s.config.model.name} (norm={s.config.model.norm}): another model')
    out = {}
    for path, value in fresh.items():
      if path in given and given[path].shape == value.shape:
        out[path] = given[path].astype(value.dtype)
        loaded.append(path)
      elif path.startswith('head/'):
        out[path] = value  # Another class count: the head starts afresh.
        new.append(f'{path} {value.shape}' + (f' (was {given[path].shape})' if path in given else ''))
      else:
        was = given[path].shape if path in given else 'missing'
        raise InputError(f'init_from={source}: {collection} {path} is {was}, '
                         f'{s.config.model.name} needs {value.shape}: another model')
    variables[collection] = flax.traverse_util.unflatten_dict(out, sep='/')
  _log('init_from %s (step %d): %d arrays loaded; new: %s', source, step, len(loaded),
       ', '.join(new) or 'none')
  replicated = NamedSharding(s.mesh, P())
  return jax.jit(functools.partial(new_state, s), out_shardings=replicated)(
      variables['params'], variables['batch_stats'])
