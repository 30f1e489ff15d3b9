"""Where TensorFlow cannot be imported (GPU hosts often have none), the
library imports, a synthetic-data run trains and writes TensorBoard events,
and asking for tfds data is a one-line exit-2 error naming the package."""

import os
import subprocess
import sys

import pytest

from bnfree_jax import report
from conftest import REPO

# Runs its argv as python -m MODULE ... (or -c CODE) as if TensorFlow and
# tensorflow-datasets were not installed: every finder misses them.
BLOCKED = r'''
import runpy, sys

class Without:
  def __init__(self, finder):
    self.finder = finder
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in ('tensorflow', 'tensorflow_datasets'):
      return None
    return self.finder.find_spec(name, path, target)
  def __getattr__(self, attr):
    return getattr(self.finder, attr)

sys.meta_path[:] = [Without(f) for f in sys.meta_path]
module, sys.argv = sys.argv[1], sys.argv[1:]
if module == '-c':
  exec(sys.argv[1])
else:
  try:
    runpy.run_module(module, run_name='__main__')
  finally:
    loaded = sorted(m for m in sys.modules if m.startswith('tensorflow'))
    print('tensorflow modules loaded:', loaded, file=sys.stderr)
'''


def run_blocked(*args):
  env = {**os.environ, 'JAX_NUM_CPU_DEVICES': '2'}
  return subprocess.run([sys.executable, '-c', BLOCKED, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def test_library_imports_without_tensorflow():
  proc = run_blocked('-c', 'import bnfree_jax.train, bnfree_jax.models, bnfree_jax.optim, '
                     'bnfree_jax.main, bnfree_jax.report, bnfree_jax.logs; print("ok")')
  assert proc.returncode == 0 and proc.stdout == 'ok\n', proc.stderr


def test_synthetic_run_writes_events_without_tensorflow(tmp_path):
  workdir = tmp_path / 'run'
  proc = run_blocked(
      'bnfree_jax.main', '--config', 'configs/resnet18_wn.py', '--workdir', str(workdir),
      '--config.dataset=synthetic', '--config.synthetic.image_size=8',
      '--config.synthetic.num_train=64', '--config.synthetic.num_eval=8',
      '--config.model.name=resnet10', '--config.histogram_layer=stage2_block0/conv2',
      '--config.model.width=4', '--config.model.stem=small', '--config.batch_size=16',
      '--config.num_train_steps=6', '--config.log_every_steps=3',
      '--config.histogram_every_steps=3', '--config.checkpoint_every_steps=6')
  assert proc.returncode == 0, proc.stderr
  assert 'tensorflow modules loaded: []' in proc.stderr
  run = report.load_run(str(workdir))
  steps, losses = run.scalars['train/loss']
  assert list(steps) == [3, 6] and all(loss > 0 for loss in losses)
  assert list(run.scalars['eval/top1'][0]) == [4, 6]  # Each epoch (4 steps) and the end.
  assert [s for s, _ in run.hists['grad_log10_magnitude/stem']] == [0, 3]
  assert run.steps_per_epoch == pytest.approx(4)  # 64 examples / 16.


def test_tfds_data_without_tensorflow_is_one_line_exit_2(tmp_path):
  proc = run_blocked('bnfree_jax.main', '--config', 'configs/resnet18_wn.py',
                     '--workdir', str(tmp_path / 'run'), '--config.dataset=cifar10')
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2, proc.stderr
  error = [line for line in lines if line.startswith('error: ')]
  assert error == [lines[-2]], lines  # The last line is the test's own report.
  assert 'dataset=cifar10' in error[0] and 'pip install tensorflow-cpu' in error[0]
  assert not (tmp_path / 'run').exists()
