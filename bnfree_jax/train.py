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
import json
import logging
import os
import resource
import signal
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from clu import metric_writers, periodic_actions
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from bnfree_jax import checkpointing, input_pipeline, metrics, models, optim, runtime, workdir as workdirs
from bnfree_jax.workdir import InputError

COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


class NonFiniteError(RuntimeError):
  """The loss or gradient became NaN or infinite."""


class Preempted(RuntimeError):
  """SIGTERM or SIGINT arrived; a checkpoint of the current step was saved."""


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  skipped: jax.Array  # Steps left out because they were not finite.


# ---------------------------------------------------------------- setup ----


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything derived from the config before anything is compiled."""
  config: Any
  info: input_pipeline.DatasetInfo
  model: Any
  optimizer: optim.Optimizer
  mesh: jax.sharding.Mesh
  steps_per_epoch: int
  total_steps: int
  eval_every_steps: int


def _check(ok, message):
  if not ok:
    raise InputError(message)


def setup(config, devices=None) -> Setup:
  """Validates the config and builds model, optimizer and mesh.

  Cheap: it reads dataset metadata only, so every bad value fails here with a
  ValueError naming it, before any compilation.
  """
  for key in ('batch_size', 'log_every_steps', 'checkpoint_every_steps',
              'keep_checkpoints', 'histogram_every_steps'):
    _check(isinstance(config[key], int) and config[key] > 0,
           f'{key}={config[key]!r} must be an integer > 0')
  _check(config.num_train_steps > 0 or config.num_epochs > 0,
         f'num_epochs={config.num_epochs!r} must be > 0 when num_train_steps is -1')
  _check(config.eval_every_steps > 0 or config.eval_every_steps == -1,
         f'eval_every_steps={config.eval_every_steps!r} must be > 0, or -1 for once per epoch')
  _check(config.on_nonfinite in ('stop', 'skip'),
         f"on_nonfinite={config.on_nonfinite!r} is not one of: stop, skip")
  _check(not config.model.wn_data_init or config.model.norm == 'weight',
         f"model.wn_data_init=True needs model.norm='weight', not {config.model.norm!r}")
  _check(config.compute_dtype in COMPUTE_DTYPES,
         f"compute_dtype={config.compute_dtype!r} is not one of: {', '.join(COMPUTE_DTYPES)}")

  devices = devices or jax.devices()  # All devices of all processes.
  mesh = jax.make_mesh((len(devices),), ('data',), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))
  num_devices = mesh.devices.size
  eval_batch_size = config.eval_batch_size if config.eval_batch_size > 0 else config.batch_size
  for key, size in (('batch_size', config.batch_size), ('eval_batch_size', eval_batch_size)):
    _check(size % num_devices == 0,
           f'{key}={size} is not divisible by the {num_devices} devices')

  info = input_pipeline.dataset_info(config)
  steps_per_epoch = info.num_train // config.batch_size
  _check(steps_per_epoch > 0, f'batch_size={config.batch_size} exceeds the '
         f'{info.num_train} training examples of {info.name}')
  total_steps = (config.num_train_steps if config.num_train_steps > 0
                 else int(config.num_epochs * steps_per_epoch))
  model = models.create_model(
      config.model.name, num_classes=info.num_classes, norm=config.model.norm,
      width=config.model.width, dropout_rate=config.model.dropout_rate,
      stem=config.model.stem, remat=config.remat,
      dtype=COMPUTE_DTYPES[config.compute_dtype])
  optimizer = optim.create_optimizer(config, steps_per_epoch, total_steps,
                                     models.weight_decay_mask)
  eval_every = config.eval_every_steps if config.eval_every_steps > 0 else steps_per_epoch
  return Setup(config, info, model, optimizer, mesh, steps_per_epoch,
               total_steps, eval_every)


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
    return TrainState(step=jnp.zeros((), jnp.int32), params=variables['params'],
                      batch_stats=variables.get('batch_stats', {}),
                      opt_state=s.optimizer.tx.init(variables['params']),
                      skipped=jnp.zeros((), jnp.int32))
  return init(batch)


def _loss_and_grads(model, state, batch, dropout_key):
  def loss_fn(params):
    logits, updated = model.apply(
        {'params': params, 'batch_stats': state.batch_stats}, batch['image'],
        train=True, rngs={'dropout': dropout_key}, mutable=['batch_stats'])
    per_example = metrics.per_example(logits, batch['label'])
    return per_example['loss'].mean(), (per_example, updated.get('batch_stats', {}))
  return jax.value_and_grad(loss_fn, has_aux=True)(state.params)


def _dropout_key(config, step):
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), 1), step)


def train_step(state: TrainState, batch, *, s: Setup):
  """One SGD step on a global batch: (state, batch) -> (state, metrics, finite)."""
  (_, (per_example, batch_stats)), grads = _loss_and_grads(
      s.model, state, batch, _dropout_key(s.config, state.step))
  grad_norm = optax.tree.norm(grads)  # Before clipping.
  updates, opt_state = s.optimizer.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  finite = jnp.isfinite(per_example['loss']).all() & jnp.isfinite(grad_norm)
  new = state.replace(params=params, batch_stats=batch_stats, opt_state=opt_state)
  # A non-finite update is never applied, whatever config.on_nonfinite says:
  # 'skip' goes on without it and 'stop' ends the run holding the last finite
  # state. Both modes thus share one compiled program.
  new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
  new = new.replace(step=state.step + 1, skipped=state.skipped + (~finite).astype(jnp.int32))

  threshold = (s.optimizer.clip_threshold(state.step)
               if s.optimizer.clip_threshold else jnp.inf)
  step_metrics = metrics.TrainMetrics.single_from_model_output(
      **per_example, grad_norm=grad_norm, clipped=(grad_norm > threshold).astype(jnp.float32),
      learning_rate=s.optimizer.learning_rate(state.step), clip_threshold=threshold,
      param_norm=optax.tree.norm(new.params), skipped_steps=new.skipped, finite=finite)
  return new, step_metrics, finite


def jit_train_step(s: Setup):
  """The compiled train step the loop runs (and bench.py measures). The state
  is donated, so its buffers are reused for the new state."""
  replicated, data = NamedSharding(s.mesh, P()), NamedSharding(s.mesh, P('data'))
  return jax.jit(functools.partial(train_step, s=s), donate_argnums=0,
                 in_shardings=(replicated, data), out_shardings=replicated)


def gradient_summaries(state: TrainState, batch, *, s: Setup):
  """Per-layer gradient norms and per-stage log-magnitude samples of the
  gradient the train step at this state and batch will take."""
  _, grads = _loss_and_grads(s.model, state, batch, _dropout_key(s.config, state.step))
  return metrics.layer_grad_norms(grads), metrics.grad_magnitude_samples(grads)


def eval_step(state: TrainState, batch, *, s: Setup):
  logits = s.model.apply({'params': state.params, 'batch_stats': state.batch_stats},
                         batch['image'], train=False)
  return metrics.EvalMetrics.single_from_model_output(
      **metrics.per_example(logits, batch['label']), mask=batch['mask'])


# ----------------------------------------------------------------- loop ----


@contextlib.contextmanager
def _completing(mngr, writer):
  """However the loop ends, the checkpoint save in flight completes and the
  metrics reach disk: an error message naming that checkpoint is true, and
  a rerun resumes from it."""
  try:
    yield
  finally:
    mngr.wait_until_finished()
    writer.flush()


def _writer(workdir):
  if jax.process_index() > 0:
    return metric_writers.MultiWriter([])
  return metric_writers.AsyncWriter(metric_writers.SummaryWriter(workdir))


def _format_duration(seconds):
  seconds = int(seconds)
  return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s'


def evaluate(s: Setup, state, eval_fn):
  """Loss, top-1 and top-5 over the whole eval split, each example once."""
  data = NamedSharding(s.mesh, P('data'))
  eval_batch_size = s.config.eval_batch_size if s.config.eval_batch_size > 0 else s.config.batch_size
  total = None
  for local in input_pipeline.eval_batches(
      s.config, local_batch_size=eval_batch_size // jax.process_count(),
      process_index=jax.process_index(), process_count=jax.process_count()):
    batch_metrics = eval_fn(state, runtime.global_array(data, local))
    total = batch_metrics if total is None else total.merge(batch_metrics)
  return {f'eval/{k}': float(v) for k, v in total.compute().items()}


def train_and_evaluate(config, workdir: str, devices=None,
                       stop: runtime.StopSignals | None = None) -> dict:
  """Trains (or, with config.eval_only, evaluates) the run in workdir,
  resuming from its newest readable checkpoint. Returns the last eval metrics.

  Raises InputError for a bad config, data or workdir; NonFiniteError when
  on_nonfinite='stop' meets a non-finite step; Preempted after SIGTERM/SIGINT,
  once a checkpoint of the current step is saved. A signal while the state is
  restored or the programs compile ends the run at the first step boundary.
  stop: the flag of a caller that took the signals over earlier (main.py, from
  its start); by default this call takes them over itself.
  """
  with runtime.StopSignals() if stop is None else contextlib.nullcontext(stop) as stop:
    return _train_and_evaluate(config, workdir, devices, stop)


def _train_and_evaluate(config, workdir, devices, stop: runtime.StopSignals) -> dict:
  s = setup(config, devices)
  workdirs.prepare_workdir(config, workdir)
  replicated, data = NamedSharding(s.mesh, P()), NamedSharding(s.mesh, P('data'))
  local_batch_size = config.batch_size // jax.process_count()
  train_batches = functools.partial(
      input_pipeline.train_batches, config, local_batch_size=local_batch_size,
      process_index=jax.process_index(), process_count=jax.process_count())

  train_fn = jit_train_step(s)
  eval_fn = jax.jit(functools.partial(eval_step, s=s), out_shardings=replicated)
  summaries_fn = jax.jit(functools.partial(gradient_summaries, s=s),
                         out_shardings=replicated)

  # State: the newest readable checkpoint, else a fresh initialization. The
  # manager's start is the first collective of the run.
  runtime.wait_for_all_processes('start')
  mngr = checkpointing.manager(workdir, keep=config.keep_checkpoints, every_steps=1)
  abstract = jax.eval_shape(lambda: init_state(s))
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                          abstract)
  try:
    state = checkpointing.restore_latest(mngr, abstract)
  except checkpointing.NoReadableCheckpointError as e:
    raise InputError(str(e)) from e
  if state is None and config.eval_only:
    raise InputError(f'workdir {workdir} has no checkpoint to evaluate')
  writer = _writer(workdir)
  log = logging.info if jax.process_index() == 0 else logging.debug

  if state is not None and (config.eval_only or int(state.step) >= s.total_steps):
    step = int(state.step)
    results = evaluate(s, state, eval_fn)
    writer.write_scalars(step, results)
    writer.flush()
    log('step %d: %s', step, ' '.join(f'{k}={v:.4f}' for k, v in results.items()))
    return results

  with _completing(mngr, writer):
    if state is None:
      first = (runtime.global_array(data, next(train_batches(start_step=0)))
               if config.model.wn_data_init else None)
      state = init_state(s, first)
    start = int(state.step)
    log('Training %s (norm=%s) on %s: steps %d..%d of %d, %d steps/epoch, '
        'global batch %d over %d devices.', config.model.name, config.model.norm,
        s.info.name, start, s.total_steps, s.total_steps, s.steps_per_epoch,
        config.batch_size, s.mesh.devices.size)
    report_progress = periodic_actions.ReportProgress(
        num_train_steps=s.total_steps, writer=writer, every_steps=config.log_every_steps)
    last_saved = mngr.latest_step()
    results, pending, train_metrics = {}, None, None
    t0, last_log_step = time.time(), start

    def ensure_finite(step, finite):
      if not bool(finite):
        where = (f'step {last_saved} in {mngr.directory}' if last_saved is not None
                 else 'none (no checkpoint was written yet)')
        raise NonFiniteError(
            f'loss or gradient is not finite at step {step}; last good checkpoint: '
            f'{where}. Lower lr_schedule.base_lr, enable grad_clip, or set '
            "on_nonfinite='skip'.")

    batches = train_batches(start_step=start)
    for step in range(start, s.total_steps):
      batch = runtime.global_array(data, next(batches))
      if step % config.histogram_every_steps == 0:
        norms, samples = summaries_fn(state, batch)
        writer.write_scalars(step, {f'grad_norm/{k}': v for k, v in norms.items()})
        writer.write_histograms(step, {f'grad_log10_magnitude/{k}': v
                                       for k, v in samples.items()})
      state, step_metrics, finite = train_fn(state, batch)
      done = step + 1
      train_metrics = (step_metrics if train_metrics is None
                       else train_metrics.merge(step_metrics))
      # Checking the previous step's flag keeps one step in flight on device.
      if config.on_nonfinite == 'stop':
        if pending is not None:
          ensure_finite(*pending)
        pending = (step, finite)

      last = done == s.total_steps
      boundary = (done % config.log_every_steps == 0, done % s.eval_every_steps == 0,
                  done % config.checkpoint_every_steps == 0)
      # Nothing is logged or saved past a non-finite step.
      if config.on_nonfinite == 'stop' and (any(boundary) or last):
        ensure_finite(*pending)
      report_progress(done)
      if boundary[0] or last:
        values = {f'train/{k}': float(v) for k, v in train_metrics.compute().items()}
        if s.optimizer.clip_threshold is None:
          del values['train/clip_threshold'], values['train/clipped_fraction']
        dt, n = time.time() - t0, done - last_log_step
        images_per_sec = n * config.batch_size / dt
        values.update({'train/epoch': done / s.steps_per_epoch,
                       'perf/images_per_sec': images_per_sec,
                       'perf/seconds_per_epoch': s.steps_per_epoch * dt / n,
                       'perf/peak_memory_gb': runtime.peak_memory_gb()})
        writer.write_scalars(done, values)
        log('step %d/%d  epoch %.2f  loss %.4f  top1 %.2f%%  %.1f img/s  ETA %s',
            done, s.total_steps, values['train/epoch'], values['train/loss'],
            100 * values['train/top1'], images_per_sec,
            _format_duration((s.total_steps - done) * dt / n))
        train_metrics, t0, last_log_step = None, time.time(), done
      if boundary[1] or last:
        results = evaluate(s, state, eval_fn)
        writer.write_scalars(done, results)
        log('step %d  eval loss %.4f  top1 %.2f%%  top5 %.2f%%', done,
            results['eval/loss'], 100 * results['eval/top1'], 100 * results['eval/top5'])
      # Asked after the eval, so a signal during it saves this very step.
      preempted = stop.requested()
      if preempted and config.on_nonfinite == 'stop':
        ensure_finite(*pending)
      if boundary[2] or last or preempted:
        checkpointing.save(mngr, done, state, force=True)
        last_saved = done
      if preempted and not last:  # After the last step there is nothing to resume.
        raise Preempted(f'{stop.received or "a stop signal"} received: saved a '
                        f'checkpoint at step {done} in {mngr.directory}')
  return results
