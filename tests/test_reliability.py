"""A run survives what ends real jobs: SIGKILL at any moment, preemption by
SIGTERM/SIGINT (exit 75 after saving the current step, also when the signal
comes while compiling or evaluating), a damaged newest checkpoint, and
non-finite steps. Every resumed run is compared bit for bit with one
uninterrupted reference run.

Cost: one compilation (the reference, in-process); the CLI runs started here
inherit JAX_NUM_CPU_DEVICES and the persistent compilation cache from
conftest, so they load the very same programs.
"""

import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from tensorboard.backend.event_processing import event_file_loader

import helpers
from bnfree_jax import checkpointing, input_pipeline, logs, optim, report, train
from bnfree_jax import workdir as workdirs
from conftest import REPO

STEPS, EVERY = 40, 8


def load(path, **overrides):
  spec = importlib.util.spec_from_file_location('tiny_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.update_from_flattened_dict(overrides)
  return config


def steps(workdir):
  return helpers.checkpoint_steps(workdir)


def state_at(workdir, step):
  return helpers.read_checkpoint(workdir, step)[1]


def assert_same_state(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """(config file, workdir of the uninterrupted run on 4 devices)."""
  root = tmp_path_factory.mktemp('reliability')
  # test_train's run, saved every EVERY steps: the same compiled programs.
  config_path = helpers.write_config(root / 'tiny.py', checkpoint_every_steps=EVERY)
  workdir = root / 'reference'
  train.train_and_evaluate(load(config_path), str(workdir))
  assert steps(workdir) == [24, 32, 40]
  return config_path, workdir


# ------------------------------------------------- real processes, signals ----


# `python -m bnfree_jax.main ARGV`, except that the train batch of step
# $PAUSE_AT_STEP is held back: the child creates $PAUSED_FILE and waits for
# $RESUME_FILE. So the test acts at a known step boundary, not at a moment
# found by polling a log.
PAUSING_MAIN = r"""
import os, sys, time
from bnfree_jax import input_pipeline, main

real = input_pipeline.train_batches
pause_at = int(os.environ['PAUSE_AT_STEP'])

def train_batches(config, *, start_step, **kw):
  for step, batch in enumerate(real(config, start_step=start_step, **kw), start_step):
    if step == pause_at:
      open(os.environ['PAUSED_FILE'], 'w').close()
      while not os.path.exists(os.environ['RESUME_FILE']):
        time.sleep(0.01)
    yield batch

input_pipeline.train_batches = train_batches
sys.exit(main.run(sys.argv))
"""


# `python -m bnfree_jax.main ARGV`, except that the process SIGKILLs itself as
# soon as the checkpoint of step $KILL_AFTER_SAVE is committed (renamed from
# orbax's tmp directory to its step).
KILLING_MAIN = r"""
import os, signal, sys
from bnfree_jax import checkpointing, main

real, kill_after = checkpointing.save, int(os.environ['KILL_AFTER_SAVE'])

def save(mngr, step, state):
  real(mngr, step, state)
  if step == kill_after:
    mngr.wait_until_finished()
    os.kill(os.getpid(), signal.SIGKILL)

checkpointing.save = save
sys.exit(main.run(sys.argv))
"""


def start_cli(procs, script, config_path, workdir, log_path, **env):
  """`python -c script` on the config, as a user would start the CLI."""
  # The child inherits this count, so it compiles the reference's programs.
  assert int(os.environ['JAX_NUM_CPU_DEVICES']) == jax.device_count()
  with open(log_path, 'w') as log:
    return procs.start(
        [sys.executable, '-c', script, '--config', str(config_path), '--workdir', str(workdir)],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env})


def launch(procs, config_path, workdir, log_path, pause_at):
  """The CLI pausing before step pause_at: returns (process, paused file,
  resume file)."""
  paused, resume = log_path.with_suffix('.paused'), log_path.with_suffix('.resume')
  proc = start_cli(procs, PAUSING_MAIN, config_path, workdir, log_path,
                   PAUSE_AT_STEP=str(pause_at), PAUSED_FILE=str(paused), RESUME_FILE=str(resume))
  return proc, paused, resume


def wait_for(path, proc, log_path, timeout=240):
  deadline = time.time() + timeout
  while not path.exists():
    if proc.poll() is not None or time.time() > deadline:
      pytest.fail(f'no {path.name} (exit code {proc.poll()}):\n{log_path.read_text()}')
    time.sleep(0.05)


def test_sigkill_then_sigterm_while_compiling_then_rerun_is_exact(reference, tmp_path):
  config_path, reference_dir = reference
  workdir = tmp_path / 'run'

  with helpers.Processes() as procs:
    # SIGKILL just after the save of step 3 * EVERY started: orbax writes it
    # asynchronously into a tmp directory, so it may be cut short.
    log1 = tmp_path / 'killed.log'
    proc, paused, _ = launch(procs, config_path, workdir, log1, pause_at=3 * EVERY)
    wait_for(paused, proc, log1)
    proc.kill()
    proc.wait()
    killed_at = steps(workdir)[-1]
    assert killed_at in (2 * EVERY, 3 * EVERY), log1.read_text()

    # The same command resumes from the newest complete checkpoint. SIGTERM
    # before its first step, which then compiles and runs: it saves that
    # step, not a multiple of checkpoint_every_steps, and exits with 75.
    log2 = tmp_path / 'preempted.log'
    proc, paused, resume = launch(procs, config_path, workdir, log2, pause_at=killed_at)
    wait_for(paused, proc, log2)
    proc.send_signal(signal.SIGTERM)
    resume.touch()
    assert proc.wait(timeout=240) == 75, log2.read_text()
  out = log2.read_text()
  assert f'steps {killed_at}..{STEPS} of {STEPS}' in out, out
  assert f'SIGTERM received: saved a checkpoint at step {killed_at + 1}' in out, out
  assert 'Traceback' not in out, out
  assert steps(workdir)[-1] == killed_at + 1
  leftovers = [d for d in os.listdir(workdir / 'checkpoints') if 'tmp' in d]
  assert not leftovers, leftovers  # A save the kill cut short was cleaned up.

  # Rerunning to the end gives the uninterrupted run's state, bit for bit:
  # parameters, optimizer state (LR and clip schedules), step counters.
  train.train_and_evaluate(load(config_path), str(workdir))
  assert_same_state(state_at(workdir, STEPS), state_at(reference_dir, STEPS))


def logged_points(workdir):
  """{(tag, step): [value, ...]}, a value per time the point was written to
  any event file of workdir (a histogram's value: its bucket counts)."""
  points = {}
  for name in sorted(os.listdir(workdir)):
    if name.startswith('events.out.tfevents.'):
      for event in event_file_loader.EventFileLoader(str(workdir / name)).Load():
        for v in event.summary.value:
          value = (v.simple_value if v.WhichOneof('value') == 'simple_value'
                   else tuple(v.histo.bucket))
          points.setdefault((v.tag, event.step), []).append(value)
  return points


def test_sigkill_after_a_checkpoint_loses_no_logged_point(reference, tmp_path, caplog):
  """Killed as soon as the checkpoint of step 32 is committed, then rerun: the
  log holds every point of the uninterrupted run exactly once, with its value
  (timings aside). tensorboardX's SummaryWriter had flushed only the first
  event (it flushes every 120 s): train/loss at 10-30 and the eval at 20
  were lost for good, as the rerun resumes at 32. The killed run's workdir
  lock, left behind, is taken over."""
  config_path, reference_dir = reference
  workdir = tmp_path / 'run'
  log = tmp_path / 'killed.log'
  with helpers.Processes() as procs:
    proc = start_cli(procs, KILLING_MAIN, config_path, workdir, log, KILL_AFTER_SAVE='32')
    assert proc.wait(timeout=300) == -signal.SIGKILL, log.read_text()
  assert steps(workdir) == [16, 24, 32]
  assert (workdir / 'lock').read_text() == f'{socket.gethostname()} {proc.pid}\n'
  with caplog.at_level(logging.WARNING), workdirs.run_lock(str(workdir)):
    train.train_and_evaluate(load(config_path), str(workdir))
  assert f'of host {socket.gethostname()} pid {proc.pid}, which ended' in caplog.text
  assert not (workdir / 'lock').exists()

  got, want = logged_points(workdir), logged_points(reference_dir)
  assert sorted(got) == sorted(want)
  assert {k: len(v) for k, v in got.items() if len(v) != 1} == {}
  timing = lambda tag: tag.startswith('perf/') or tag == 'steps_per_sec'
  assert {k: v for k, v in got.items() if not timing(k[0])} == {
      k: v for k, v in want.items() if not timing(k[0])}
  assert ('train/loss', 30) in got and ('eval/loss', 20) in got


@pytest.fixture
def sigint_guard():
  """Should the trainer fail to catch SIGINT, this handler takes it instead of
  KeyboardInterrupt ending the whole pytest session."""
  caught = []
  old = signal.signal(signal.SIGINT, lambda *_: caught.append('SIGINT'))
  yield caught
  signal.signal(signal.SIGINT, old)


def test_sigint_during_eval_saves_that_step(reference, tmp_path, monkeypatch, sigint_guard):
  """Ctrl-C while evaluating: no KeyboardInterrupt, but the step just
  evaluated is saved and the run stops (resuming such a checkpoint exactly is
  the SIGTERM test's part)."""
  config_path, _ = reference
  real = input_pipeline.eval_batches

  def eval_batches_then_sigint(config, **kw):
    for i, batch in enumerate(real(config, **kw)):
      if i == 1:  # Mid-way through the first eval, at step 20.
        signal.raise_signal(signal.SIGINT)
      yield batch
  monkeypatch.setattr(input_pipeline, 'eval_batches', eval_batches_then_sigint)
  with pytest.raises(train.Preempted, match='SIGINT received: saved a checkpoint at step 20 '):
    train.train_and_evaluate(load(config_path), str(tmp_path))
  assert not sigint_guard  # The trainer's own handler took it.
  assert steps(tmp_path) == [8, 16, 20]
  assert int(state_at(tmp_path, 20)['step']) == 20


def test_sigint_while_restoring_stops_at_the_first_step(reference, tmp_path, monkeypatch,
                                                        sigint_guard):
  """A signal before the loop (here: while the state is restored) is kept for
  it: the run ends at its first step boundary, with a checkpoint."""
  config_path, _ = reference
  real = checkpointing.restore_latest

  def sigint_then_restore(*args, **kwargs):
    signal.raise_signal(signal.SIGINT)
    return real(*args, **kwargs)
  monkeypatch.setattr(checkpointing, 'restore_latest', sigint_then_restore)
  with pytest.raises(train.Preempted, match='SIGINT received: saved a checkpoint at step 1 '):
    train.train_and_evaluate(load(config_path), str(tmp_path))
  assert not sigint_guard
  assert steps(tmp_path) == [1]


# -------------------------------------------------- damaged checkpoints ----


def test_corrupt_newest_checkpoint_falls_back_and_is_kept(reference, tmp_path, caplog):
  config_path, reference_dir = reference
  workdir = tmp_path / 'run'
  shutil.copytree(reference_dir, workdir)
  newest = workdir / 'checkpoints' / str(STEPS)
  damaged = helpers.damage_checkpoint(newest)  # Half-written array data.

  with caplog.at_level(logging.INFO):
    train.train_and_evaluate(load(config_path), str(workdir))
  messages = [r.getMessage() for r in caplog.records]
  assert any(f'Checkpoint at step {STEPS} ' in m and 'cannot be read' in m
             for m in messages), messages
  # It resumed from step 32, the newest readable checkpoint, and trained to
  # the end exactly as before; the damaged checkpoint is kept byte for byte.
  assert any(f'steps 32..{STEPS} of {STEPS}' in m for m in messages), messages
  assert steps(workdir) == [24, 32, 40]
  assert_same_state(state_at(workdir, STEPS), state_at(reference_dir, STEPS))
  aside = [d for d in os.listdir(workdir / 'checkpoints') if d.startswith(f'{STEPS}.corrupt-')]
  assert len(aside) == 1
  for f, content in damaged.items():
    moved = f.replace(str(newest), str(workdir / 'checkpoints' / aside[0]))
    assert open(moved, 'rb').read() == content


# ---------------------------------------------------- non-finite steps ----


def nan_batches_at(monkeypatch, bad_steps):
  real = input_pipeline.train_batches

  def train_batches(config, *, start_step, **kw):
    for step, batch in enumerate(real(config, start_step=start_step, **kw), start_step):
      if step in bad_steps:
        batch = {**batch, 'image': np.full_like(batch['image'], np.nan)}
      yield batch
  monkeypatch.setattr(input_pipeline, 'train_batches', train_batches)


def test_nonfinite_stop_names_step_and_last_checkpoint(reference, tmp_path, monkeypatch):
  config_path, _ = reference
  nan_batches_at(monkeypatch, {13})
  with pytest.raises(train.NonFiniteError) as e:
    train.train_and_evaluate(load(config_path), str(tmp_path))
  message = str(e.value)
  assert 'not finite at step 13;' in message, message
  assert f'last good checkpoint: step 8 in {tmp_path}' in message, message
  assert steps(tmp_path) == [8]
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state_at(tmp_path, 8)))


def test_nonfinite_skip_counts_and_goes_on(reference, tmp_path, monkeypatch):
  config_path, _ = reference
  nan_batches_at(monkeypatch, {13, 25})
  train.train_and_evaluate(load(config_path, on_nonfinite='skip'), str(tmp_path))
  final = state_at(tmp_path, STEPS)
  assert int(final['skipped']) == 2 and int(final['step']) == STEPS
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(final))
  scalars = report.load_run(str(tmp_path)).scalars
  skipped = dict(zip(*scalars['train/skipped_steps']))
  assert skipped == {10: 0.0, 20: 1.0, 30: 2.0, 40: 2.0}  # Counted, never reset.
  # The skipped steps' NaNs stay out of the interval averages.
  for tag in ('train/loss', 'train/top1', 'train/grad_norm'):
    values = scalars[tag][1]
    assert len(values) == 4 and np.isfinite(values).all(), (tag, values)


# ------------------------------------------------------------ full disk ----


@pytest.fixture
def small_disk(tmp_path):
  """A 64 MiB tmpfs mounted at tmp_path/disk, unmounted when the test ends.
  Mounting needs root, which CI has; elsewhere the test fails saying so."""
  disk = tmp_path / 'disk'
  disk.mkdir()
  mount = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=64m', 'tmpfs', str(disk)],
                         capture_output=True, text=True)
  if mount.returncode:
    pytest.fail(f'this test mounts a small tmpfs, which needs root: {mount.stderr.strip()}')
  try:
    yield disk
  finally:
    subprocess.run(['umount', str(disk)], check=True)


# Orbax's failed save leaves a tensorstore callback that posts to orbax's
# closed event loop ('Event loop is closed'), which Python can only ignore.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_a_full_disk_stops_the_run_and_a_rerun_resumes(reference, small_disk, monkeypatch,
                                                       caplog):
  """The disk fills up before step 22, 64 KiB left (the event log's few KiB
  a step fit): the checkpoint of step 24 cannot be written, which orbax
  reports at the next save or wait; the event log at step 30 may fail first,
  as the broken save ate the rest. The run stops naming both paths and
  step 16, intact; with room again, a rerun resumes from it and ends as the
  uninterrupted run did, bit for bit."""
  config_path, reference_dir = reference
  workdir = small_disk / 'run'
  real = input_pipeline.train_batches

  def train_batches(config, *, start_step, **kw):
    for step, batch in enumerate(real(config, start_step=start_step, **kw), start_step):
      if step == 22:
        with open(small_disk / 'filler', 'wb') as f:
          os.posix_fallocate(f.fileno(), 0, shutil.disk_usage(small_disk).free - 64 * 1024)
      yield batch
  monkeypatch.setattr(input_pipeline, 'train_batches', train_batches)
  with pytest.raises(train.WriteError) as e:
    train.train_and_evaluate(load(config_path), str(workdir))
  message = str(e.value)
  assert '\n' not in message and f'cannot write a checkpoint in {workdir}/checkpoints: ' in message
  assert 'No space left on device' in message, message
  assert message.endswith(f'; the newest complete checkpoint: step 16 in {workdir}/checkpoints, '
                          'which a rerun resumes'), message
  assert steps(workdir) == [8, 16] and int(state_at(workdir, 16)['step']) == 16

  monkeypatch.undo()
  os.remove(small_disk / 'filler')
  with caplog.at_level(logging.INFO):
    train.train_and_evaluate(load(config_path), str(workdir))
  assert f'steps 16..{STEPS} of {STEPS}' in caplog.text
  assert_same_state(state_at(workdir, STEPS), state_at(reference_dir, STEPS))
  assert [d for d in os.listdir(workdir / 'checkpoints') if not d.isdigit()] == []


# ------------------------------------------------ silent divergence ----


def watch(**changes):
  """A DivergenceWatch of 10 classes (chance 2.3026), warm-up 100 steps,
  patience 3, loss factor 4, armed for chance at best <= 2.0723."""
  return train.DivergenceWatch(**{'num_classes': 10, 'warmup_steps': 100, 'patience': 3,
                                  'loss_factor': 4.0, 'chance_drop': 0.1, **changes})


def seen(w, losses, every=50):
  """What w.update says for losses logged every `every` steps from step every."""
  return [w.update(every * (i + 1), loss) for i, loss in enumerate(losses)]


def test_divergence_watch_counts_intervals_at_chance_or_far_above_the_best():
  chance = 'at or above chance (ln 10 = 2.3026)'
  # A run that sits at chance before it learns (its best never 10% below) is
  # slow, not diverged; one that learned and falls back to chance is.
  assert seen(watch(), [2.35, 2.31, 2.30, 2.31, 2.29, 2.31, 2.30, 2.32, 1.5, 0.9]) == [None] * 10
  assert seen(watch(), [2.3, 1.5, 2.0, 2.31, 2.4, 2.303, 2.4]) == [None] * 5 + [chance] * 2
  # Never three in a row.
  assert seen(watch(), [2.3, 1.5, 2.31, 2.0, 2.31, 2.4, 1.9, 2.5, 2.6]) == [None] * 9
  # Above 4 x the best (0.1): 0.41 three times; 0.4 is not above.
  assert seen(watch(), [1.0, 0.1, 0.41, 0.4, 0.41, 0.5, 0.41]) == (
      [None] * 6 + ['above 4 x its best'])
  # Intervals ending within the warm-up (steps <= 100) do not count.
  assert seen(watch(), [1.0, 2.4, 2.4, 2.4, 2.4], every=40) == [None] * 4 + [chance]
  assert seen(watch(warmup_steps=0), [1.0, 2.4, 2.4, 2.4], every=40) == [None] * 3 + [chance]


def test_divergence_watch_resumes_from_the_logged_losses(tmp_path):
  """A resumed run's watch replays the train losses logged up to its start:
  those of the attempt that last logged each step (a killed attempt logged
  past its checkpoint, and the next one logged those steps again)."""
  s = train.setup(helpers.tiny_config(**{'divergence.patience': 3}))  # 4 classes, warm-up 4.
  first = logs.Writer(str(tmp_path))
  for step, loss in [(10, 1.4), (20, 1.0), (30, 1.39), (40, 1.0)]:
    first.write_scalars(step, {'train/loss': loss})
  first.close()
  time.sleep(1.1)  # Event files are named by the second they were created.
  second = logs.Writer(str(tmp_path))  # Resumed at 30: logs 40 again, and 50.
  for step, loss in [(40, 1.5), (50, 1.6)]:
    second.write_scalars(step, {'train/loss': loss})
  second.close()
  w = train.watch_divergence(s, str(tmp_path), start=50)
  assert (w.best, w.count) == (pytest.approx(1.0), 3)  # 30, 40, 50 at or above ln 4.
  w = train.watch_divergence(s, str(tmp_path), start=40)
  assert (w.best, w.count) == (pytest.approx(1.0), 2)
  assert w.update(60, 1.4) == 'at or above chance (ln 4 = 1.3863)'


def test_a_run_that_falls_to_chance_saves_says_so_and_stops(reference, tmp_path, monkeypatch):
  """From step 20 on every label is shifted by one class and every image
  scaled by 4, so that the network's confidence in the old labels costs: the
  loss, 1.29 at step 20 (5% under chance, ln 4 = 1.386), is 1.70 at 30 (with
  the shift alone 1.383 or 1.39, as the rounding fell). With patience 1 and
  chance_drop 0.05 the run stops there, saved, 10 steps early."""
  config_path, _ = reference
  real = input_pipeline.train_batches

  def train_batches(config, *, start_step, **kw):
    for step, batch in enumerate(real(config, start_step=start_step, **kw), start_step):
      yield ({**batch, 'image': 4 * batch['image'], 'label': (batch['label'] + 1) % 4}
             if step >= 20 else batch)
  monkeypatch.setattr(input_pipeline, 'train_batches', train_batches)
  config = load(config_path, **{'divergence.patience': 1, 'divergence.chance_drop': 0.05})
  with pytest.raises(train.Diverged) as e:
    train.train_and_evaluate(config, str(tmp_path))
  losses = dict(logs.read_scalars(str(tmp_path), 'train/loss'))
  assert sorted(losses) == [10, 20, 30]
  assert losses[20] < 0.95 * np.log(4) <= np.log(4) <= losses[30]
  lr = float(optim.create_optimizer(config, 16, STEPS, None).learning_rate(29))
  assert str(e.value) == (
      f'train loss at or above chance (ln 4 = 1.3863) for 1 log intervals: {losses[30]:.4f} at '
      f'step 30, best logged {losses[20]:.4f}, LR {lr:.4g}; saved a checkpoint at step 30 in '
      f"{tmp_path}/checkpoints. Lower lr_schedule.base_lr or enable grad_clip; "
      "on_divergence='ignore' trains on.")
  assert steps(tmp_path) == [16, 24, 30]
  assert isinstance(e.value, train.NonFiniteError)  # main.py: exit code 3.


def test_skipped_steps_keep_the_applied_lr_and_threshold_on_schedule():
  """Update by update, with non-finite gradients at some steps: every applied
  step is PyTorch's SGD (clip by global norm, weight decay, momentum buffer of
  raw gradients) at the LR and threshold of its own step, as if the skipped
  steps had never come, and a skipped step changes nothing."""
  config = helpers.tiny_config(**{'lr_schedule.warmup_epochs': 0.5,
                                  'optimizer.weight_decay_on': 'all'})
  per_epoch, total, nonfinite = 4, 24, {3, 9, 10, 17}
  opt = optim.create_optimizer(config, per_epoch, total, weight_decay_mask=None)
  wd, m = config.optimizer.weight_decay, config.optimizer.momentum
  rng = np.random.default_rng(0)
  params = {'conv': {'kernel': rng.normal(size=(3, 3, 2, 4))}, 'head': {'bias': rng.normal(size=5)}}
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  opt_state, buf = opt.tx.init(params), None
  apply = jax.jit(lambda g, finite, p, o: train.apply_if_finite(opt.tx, g, finite, p, o))
  for step in range(total):
    # Norms from 0.5 to 12: clipped at some steps, not at others (threshold 5 -> 1).
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * (0.5 + step % 5) / 8,
                                               jnp.float32), params)
    finite = step not in nonfinite
    if not finite:
      grads['head']['bias'] = grads['head']['bias'].at[0].set(jnp.nan)
    new_params, opt_state = apply(grads, jnp.asarray(finite), params, opt_state)
    if finite:  # The reference, in float64.
      g = jax.tree.map(lambda x: np.asarray(x, np.float64), grads)
      norm = np.sqrt(sum((x ** 2).sum() for x in jax.tree.leaves(g)))
      g = jax.tree.map(lambda x, p: x * min(1.0, float(opt.clip_threshold(step)) / norm)
                       + wd * np.asarray(p, np.float64), g, params)
      buf = g if buf is None else jax.tree.map(lambda b, x: m * b + x, buf, g)
      expected = jax.tree.map(lambda p, b: p - float(opt.learning_rate(step)) * b, params, buf)
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                   new_params, expected)
    else:
      assert_same_state(new_params, params)
    params = new_params
  assert len({float(opt.clip_threshold(s)) for s in range(total)}) == 6  # One per epoch.
  assert float(opt.learning_rate(total - 1)) < float(opt.learning_rate(2)) / 10


def test_nonfinite_step_leaves_params_and_optimizer_untouched(reference):
  """The compiled step itself, on the reference's step 24 and a batch of inf:
  what on_nonfinite='skip' relies on (and 'stop' too: both modes share it)."""
  config_path, reference_dir = reference
  config = load(config_path)
  s = train.setup(config)
  replicated = NamedSharding(s.mesh, P())
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                          jax.eval_shape(lambda: train.init_state(s)))
  with ocp.CheckpointManager(os.path.join(reference_dir, 'checkpoints')) as mngr:
    state = mngr.restore(24, args=ocp.args.StandardRestore(abstract))
  before = jax.device_get(state)  # The step donates state's buffers.
  batch = next(input_pipeline.train_batches(config, steps_per_epoch=s.steps_per_epoch,
                                            start_step=24, local_batch_size=16,
                                            process_index=0, process_count=1))
  batch = {**batch, 'image': np.full_like(batch['image'], np.inf)}
  batch = jax.device_put(batch, NamedSharding(s.mesh, P('data')))
  new, finite = train.jit_train_step(s)(state, batch)
  assert not bool(finite)
  new = jax.device_get(new)
  counts = lambda state: [x for path, x in jax.tree_util.tree_leaves_with_path(state.opt_state)
                          if getattr(path[-1], 'name', None) == 'count']
  rest = lambda state: (state.params, state.batch_stats, jax.tree.map_with_path(
      lambda path, x: None if getattr(path[-1], 'name', None) == 'count' else x,
      state.opt_state))
  assert_same_state(rest(new), rest(before))  # Momentum and parameters untouched.
  # The update counters advance, so every schedule stays a function of the step.
  assert counts(before) and [int(c) for c in counts(new)] == [int(c) + 1 for c in counts(before)]
  assert (int(new.step), int(new.skipped)) == (25, int(before.skipped) + 1)
