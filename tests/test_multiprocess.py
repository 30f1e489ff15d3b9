"""Two processes with one CPU device each, talking over gloo on 127.0.0.1,
train and evaluate exactly as one process with two devices, stop together
when only one of them gets SIGTERM, and only process 0 writes metrics and the
run's files."""

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np

import helpers
from bnfree_jax import report
from conftest import REPO

STEPS = 16
MODEL = helpers.tiny_config().model.name

# Batch norm, whose statistics span the global batch, so across processes;
# no dropout: its threefry bits triple the compile time on CPU, and the three
# processes here compile everything for themselves. One epoch of 16 steps.
OVERRIDES = {'model.norm': 'batch', 'model.dropout_rate': 0.0, 'num_train_steps': STEPS,
             'lr_schedule.base_lr': 0.05, 'log_every_steps': 4, 'histogram_every_steps': 8,
             'checkpoint_every_steps': 8, 'eval_every_steps': 8}


@contextlib.contextmanager
def reserved_port():
  """A free port of 127.0.0.1, kept bound (not listening) while in use: with
  SO_REUSEADDR the coordinator of process 0 can still bind and listen on it,
  but no ephemeral port (another test's, a connection's) can take it between
  the choice and the coordinator's start."""
  with socket.socket() as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(('127.0.0.1', 0))
    yield s.getsockname()[1]


def wait_for_text(path, text, procs, timeout=300):
  deadline = time.time() + timeout
  while text not in path.read_text():
    assert all(p.poll() is None for p in procs) and time.time() < deadline, path.read_text()
    time.sleep(0.1)


def test_two_processes_train_exactly_like_one_process_with_two_devices(tmp_path):
  """Process 1 alone gets SIGTERM: both save the same step and exit 75; rerun,
  they resume and end with the very state and eval metrics of one process
  with two devices, whose last eval batch holds rows 8, 9 on process 0 and
  only padding on process 1."""
  config = helpers.write_config(tmp_path / 'tiny.py', **OVERRIDES)
  logs = tmp_path / 'logs'
  logs.mkdir()

  with helpers.Processes() as procs, reserved_port() as port:
    def start(name, workdir, devices, *flags, **env):
      with open(logs / f'{name}.log', 'w') as log:
        return procs.start(
            [sys.executable, '-m', 'bnfree_jax.main', '--config', str(config),
             '--workdir', str(tmp_path / workdir), *flags],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, 'JAX_NUM_CPU_DEVICES': str(devices), **env})

    def two_processes(attempt):
      # Each process compiles for itself: on CPU, process 1 finds nothing of
      # process 0's in JAX's persistent cache (their cache keys differ), so
      # with a shared warm cache process 0 would wait at the first collective
      # for longer than gloo's fixed 30 s connection timeout. Each has its own
      # cache, which its rerun loads from.
      return [start(f'two.{attempt}.{i}', 'two', 1, f'--coordinator_address=127.0.0.1:{port}',
                    '--num_processes=2', f'--process_id={i}',
                    JAX_COMPILATION_CACHE_DIR=str(tmp_path / f'cache{i}')) for i in (0, 1)]

    def wait(named_procs, code):
      for name, proc in named_procs.items():
        # Every log: when one process fails, another may be the first to show it.
        assert proc.wait(timeout=500) == code, '\n'.join(
            f'--- {log.name}\n' + log.read_text() for log in sorted(logs.iterdir()))

    two, one = two_processes('a'), start('one', 'one', 2)
    # Both processes are past their input checks once process 0 states its
    # plan; the first step still has to compile.
    wait_for_text(logs / 'two.a.0.log', f'Training {MODEL}', two)
    two[1].send_signal(signal.SIGTERM)
    wait({'two.a.0': two[0], 'two.a.1': two[1]}, 75)
    log0, log1 = ((logs / f'two.a.{i}.log').read_text() for i in (0, 1))
    stopped = int(re.search(r'SIGTERM received: saved a checkpoint at step (\d+) ', log1)[1])
    assert f'a stop signal received: saved a checkpoint at step {stopped} ' in log0, log0
    assert 0 < stopped < STEPS and helpers.checkpoint_steps(tmp_path / 'two')[-1] == stopped

    two = two_processes('b')
    wait({'two.b.0': two[0], 'two.b.1': two[1], 'one': one}, 0)

  # Bit for bit: the same sharded program, the same global batches.
  jax.tree.map(np.testing.assert_array_equal, helpers.read_checkpoint(tmp_path / 'two', STEPS),
               helpers.read_checkpoint(tmp_path / 'one', STEPS))
  two, one = (report.load_run(str(tmp_path / d)).scalars for d in ('two', 'one'))
  for tag in ('eval/loss', 'eval/top1', 'eval/top5'):
    np.testing.assert_array_equal(two[tag][0], [8, 16])
    np.testing.assert_array_equal(two[tag][1], one[tag][1], err_msg=tag)
  # One epoch: the 'log' clip schedule has no second epoch to move to.
  np.testing.assert_array_equal(one['train/clip_threshold'][1], [5.0] * 4)

  # One set of run files, written by process 0; process 1 adds only its
  # shards inside orbax's checkpoints.
  files = sorted(os.listdir(tmp_path / 'two'))
  assert files[:2] == ['checkpoints', 'config.json'] and len(files) == 4, files
  assert all(f.startswith('events.out.tfevents.') for f in files[2:]), files  # One per attempt.
  assert helpers.checkpoint_steps(tmp_path / 'two') == sorted({stopped, 8, STEPS})
  log0, log1 = ((logs / f'two.b.{i}.log').read_text() for i in (0, 1))
  assert f'{MODEL} (norm=batch)' in log0 and 'global batch 16 over 2 devices' in log0, log0
  assert f'steps {stopped}..{STEPS} of {STEPS}' in log0, log0
  assert f'step {STEPS}/{STEPS}' in log0, log0
  assert 'step ' not in log1, log1


def test_bad_input_in_one_process_stops_all_at_once(tmp_path):
  """Process 1 alone gets a batch size its 2 devices cannot split: both exit
  2 before compiling, process 0 naming process 1's error, instead of process 0
  waiting at its first barrier until the shutdown timeout."""
  config = helpers.write_config(tmp_path / 'tiny.py', **OVERRIDES)
  with helpers.Processes() as started, reserved_port() as port:
    procs = [started.start(
        [sys.executable, '-m', 'bnfree_jax.main', '--config', str(config),
         '--workdir', str(tmp_path / 'run'), f'--coordinator_address=127.0.0.1:{port}',
         '--num_processes=2', f'--process_id={i}', *(['--config.batch_size=15'] if i else [])],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, 'JAX_NUM_CPU_DEVICES': '1'}) for i in (0, 1)]
    errors = [proc.communicate(timeout=120)[1] for proc in procs]
  assert [proc.returncode for proc in procs] == [2, 2], errors
  own = 'batch_size=15 is not divisible by the 2 devices'
  assert errors[1].splitlines()[-1].startswith(f'error: {own}'), errors[1]
  assert errors[0].splitlines()[-1].startswith(f'error: process 1: {own}'), errors[0]
  assert not (tmp_path / 'run' / 'config.json').exists()
