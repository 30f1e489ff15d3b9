"""How far the tests' tiny run on one device drifts from the same run on four,
step by step (results/bench/cpu_gap.md section 6).

  python scripts/device_drift.py [--steps 8] [--lr 0.1] [--warmup_epochs 0.25]

Trains tests/helpers.tiny_config once on one CPU device and once on four
(checkpointing every step, with the test suite's XLA flags), then prints,
per step, the relative norm of the parameters' difference and its largest
entry; then the layers that differ most at --detail_steps. Run it from a
checkout; the tests' tolerances in test_train rest on what it shows.
"""

import argparse
import os
import pathlib
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parent.parent
os.environ.setdefault('JAX_NUM_CPU_DEVICES', '4')
sys.path[:0] = [str(REPO), str(REPO / 'tests')]
import conftest  # noqa: E402,F401  The suite's XLA flags and CPU collectives.
import helpers  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from bnfree_jax import train  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=8)
  parser.add_argument('--lr', type=float, default=0.1, help='the schedule\'s base_lr')
  parser.add_argument('--warmup_epochs', type=float, default=0.25,
                      help='tiny_config: 0.25 (4 steps of 16 per epoch)')
  parser.add_argument('--detail_steps', type=int, nargs='*', default=[],
                      help='steps whose most different layers to list')
  args = parser.parse_args()

  workdirs = {}
  for devices in (1, 4):
    workdirs[devices] = tempfile.mkdtemp(prefix=f'drift{devices}_')
    c = helpers.tiny_config(**{
        'checkpoint_every_steps': 1, 'keep_checkpoints': args.steps + 1,
        'num_train_steps': args.steps, 'eval_every_steps': args.steps + 1,
        'lr_schedule.base_lr': args.lr, 'lr_schedule.warmup_epochs': args.warmup_epochs})
    train.train_and_evaluate(c, workdirs[devices], devices=jax.devices()[:devices])

  def params(devices, step):
    return helpers.read_checkpoint(workdirs[devices], step)[1]['params']

  print('step  |1 dev - 4 dev| / |4 dev|  max |diff|')
  for step in range(1, args.steps + 1):
    a, b = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(params(d, step))])
            for d in (1, 4))
    print(f'{step:4d}  {np.linalg.norm(a - b) / np.linalg.norm(b):24.3g}  {np.abs(a - b).max():.3g}')
  for step in args.detail_steps:
    b = dict(jax.tree_util.tree_leaves_with_path(params(4, step)))
    rows = sorted(((float(np.abs(x - b[path]).max()), jax.tree_util.keystr(path))
                   for path, x in jax.tree_util.tree_leaves_with_path(params(1, step))),
                  reverse=True)
    print(f'step {step}, the layers that differ most:')
    for diff, name in rows[:12]:
      print(f'  {diff:.3g}  {name}')


if __name__ == '__main__':
  main()
