"""Two processes with one CPU device each, talking over gloo on 127.0.0.1,
train exactly as one process with two devices, and only process 0 writes
metrics and the run's files."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

from conftest import REPO

STEPS = 16

# Batch norm, whose statistics span the global batch, so across processes;
# no dropout: its threefry bits triple the compile time on CPU, and the three
# processes here compile everything for themselves.
CONFIG = f'''
from configs import default


def get_config():
  c = default.get_config()
  c.dataset = 'synthetic'
  c.synthetic.update(image_size=16, channels=3, num_classes=4, num_train=256, num_eval=10)
  c.model.update(name='resnet18', norm='batch', width=8, stem='small')
  c.batch_size = 16
  c.eval_batch_size = 4
  c.num_train_steps = {STEPS}
  c.lr_schedule.update(name='linear', base_lr=0.05, warmup_epochs=0.25, warmup_init_lr=0.01)
  c.grad_clip.update(mode='log', threshold=5.0, final_threshold=1.0)
  c.log_every_steps = 4
  c.histogram_every_steps = 8
  c.checkpoint_every_steps = 8
  c.eval_every_steps = 8
  return c
'''


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def numpy_state(workdir, step):
  """A checkpoint as numpy arrays, whatever devices wrote it."""
  path = os.path.join(workdir, 'checkpoints', str(step), 'default')
  with ocp.PyTreeCheckpointer() as ckptr:
    metadata = ckptr.metadata(path).item_metadata.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
    return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def test_two_processes_train_exactly_like_one_process_with_two_devices(tmp_path):
  config = tmp_path / 'tiny.py'
  config.write_text(CONFIG)

  def start(name, devices, *flags, **env):
    with open(tmp_path / f'{name}.log', 'w') as log:
      return subprocess.Popen(
          [sys.executable, '-m', 'bnfree_jax.main', '--config', str(config),
           '--workdir', str(tmp_path / name.split('.')[0]), *flags],
          cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
          env={**os.environ, 'JAX_NUM_CPU_DEVICES': str(devices), **env})

  port = free_port()
  # Each process compiles for itself: on CPU, process 1 finds nothing of
  # process 0's in JAX's persistent cache (their cache keys differ), so with
  # a warm cache process 0 would wait at the first collective for longer than
  # gloo's fixed 30 s connection timeout.
  two = [start(f'two.{i}', 1, f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
               f'--process_id={i}', JAX_ENABLE_COMPILATION_CACHE='false') for i in (0, 1)]
  one = start('one', 2)
  names = ('two.0', 'two.1', 'one')
  for name, proc in zip(names, (*two, one)):
    # Every log: when one process fails, another may be the first to show it.
    assert proc.wait(timeout=500) == 0, '\n'.join(
        f'--- {n}.log\n' + (tmp_path / f'{n}.log').read_text() for n in names)

  # Bit for bit: the same sharded program, the same global batches.
  jax.tree.map(np.testing.assert_array_equal, numpy_state(tmp_path / 'two', STEPS),
               numpy_state(tmp_path / 'one', STEPS))

  # One set of run files, written by process 0; process 1 adds only its
  # shards inside orbax's checkpoints.
  files = sorted(os.listdir(tmp_path / 'two'))
  assert files[:2] == ['checkpoints', 'config.json'] and len(files) == 3, files
  assert files[2].startswith('events.out.tfevents.'), files
  assert sorted(os.listdir(tmp_path / 'two' / 'checkpoints')) == ['16', '8']
  log0, log1 = ((tmp_path / f'two.{i}.log').read_text() for i in (0, 1))
  assert 'resnet18 (norm=batch)' in log0 and 'global batch 16 over 2 devices' in log0, log0
  assert f'step {STEPS}/{STEPS}' in log0, log0
  assert 'step ' not in log1, log1


def test_bad_input_in_one_process_stops_all_at_once(tmp_path):
  """Process 1 alone gets a batch size its 2 devices cannot split: both exit
  2 before compiling, process 0 naming process 1's error, instead of process 0
  waiting at its first barrier until the shutdown timeout."""
  config = tmp_path / 'tiny.py'
  config.write_text(CONFIG)
  port = free_port()
  procs = [subprocess.Popen(
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
