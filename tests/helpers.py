"""What the tests that train share: the tiny run's config (in-process, or as
a file the CLI loads), reading checkpoints, damaging them; and stub commands
for the tests of shell scripts."""

import os
import pathlib
import subprocess

import jax
import numpy as np
import orbax.checkpoint as ocp

from configs import default

TESTS = pathlib.Path(__file__).resolve().parent
STEPS = 40


def tiny_config(**overrides):
  """The paper's recipe (weight-normalized ResNet with dropout, warm-up then
  linear decay, log-scheduled clipping) at toy size: a ResNet-10 (every kind
  of block ResNet-18 has, in two thirds of its compile time, which is most
  of a test's) of width 8 on 16-px synthetic images of 4 classes, global
  batch 16, 16 steps per epoch, 40 steps. At base_lr 0.1 the loss falls
  well within them; past the 4-step warm-up the trajectory is chaotic
  enough to amplify rounding (see test_train's one-device test).

  overrides: {'dotted.key': value}, applied last. Every test run built on
  this shares its compiled programs with the others through JAX's persistent
  cache, unless an override changes the model, the optimizer, the batch
  shapes or the seed.
  """
  c = default.get_config()
  c.dataset = 'synthetic'
  c.synthetic.update(image_size=16, channels=3, num_classes=4, num_train=256, num_eval=10)
  c.model.update(name='resnet10', norm='weight', width=8, stem='small', dropout_rate=0.1)
  c.batch_size = 16
  c.eval_batch_size = 4
  c.num_train_steps = STEPS
  c.lr_schedule.update(name='linear', base_lr=0.1, warmup_epochs=0.25, warmup_init_lr=0.01,
                       end_lr=0.0)
  c.grad_clip.update(mode='log', threshold=5.0, final_threshold=1.0)
  c.log_every_steps = 10
  c.histogram_every_steps = 20
  c.histogram_layer = 'stage2_block0/conv2'  # The default's block1 is ResNet-18's.
  c.checkpoint_every_steps = 16
  c.eval_every_steps = 20
  c.update_from_flattened_dict(overrides)
  return c


_CONFIG_FILE = '''import sys

sys.path.insert(0, {tests!r})
from helpers import tiny_config  # noqa: E402


def get_config():
  c = tiny_config(**{overrides!r})
{body}  return c
'''


def write_config(path, *statements, **overrides):
  """Writes a config file for `python -m bnfree_jax.main --config path`:
  tiny_config(**overrides), then `statements` (lines of code on `c`)."""
  body = ''.join(f'  {line}\n' for line in statements)
  path = pathlib.Path(path)
  path.write_text(_CONFIG_FILE.format(tests=str(TESTS), overrides=overrides, body=body))
  return path


def checkpoint_steps(workdir):
  """Steps of the finished checkpoints (orbax renames a save to its bare step
  number only once it is complete)."""
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def read_checkpoint(workdir, step=None):
  """(step, train state as nested dicts of numpy arrays) of the newest
  checkpoint in workdir, or of `step`, whatever devices or processes wrote it."""
  step = checkpoint_steps(workdir)[-1] if step is None else step
  path = os.path.join(workdir, 'checkpoints', str(step), 'default')
  with ocp.PyTreeCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(path).item_metadata.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
    return step, checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def damage_checkpoint(step_dir):
  """Truncates every array data file of a checkpoint to half, as a full disk
  would; returns {file: the bytes left in it}."""
  files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs
           if f'{os.sep}d{os.sep}' in os.path.join(d, f)]
  assert files, f'no array data files under {step_dir}'
  for f in files:
    with open(f, 'r+b') as fh:
      fh.truncate(max(os.path.getsize(f) // 2, 1))
  return {f: open(f, 'rb').read() for f in files}


def stub(directory, name, body):
  """An executable bash script directory/name running body."""
  directory.mkdir(exist_ok=True)
  path = directory / name
  path.write_text('#!/usr/bin/env bash\n' + body)
  path.chmod(0o755)
  return path


class Processes:
  """Child processes that are killed, whatever happens, when the with block
  ends: a test that fails or times out leaves none running."""

  def __init__(self):
    self.procs = []

  def __enter__(self):
    return self

  def start(self, *args, **kwargs) -> subprocess.Popen:
    proc = subprocess.Popen(*args, **kwargs)
    self.procs.append(proc)
    return proc

  def __exit__(self, *exc):
    for proc in self.procs:
      if proc.poll() is None:
        proc.kill()
      proc.wait()
