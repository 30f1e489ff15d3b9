"""scripts/dp_vs_opacus.py's table from fixed records: per-example medians
over rounds, and each round's ratio of the two DP steps."""

import importlib.util
import pathlib

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / 'scripts' / 'dp_vs_opacus.py'
spec = importlib.util.spec_from_file_location('dp_vs_opacus', SCRIPT)
dp_vs_opacus = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dp_vs_opacus)


def test_table_from_fixed_records():
  geometry = dict(model='resnet10', width=8, stem='small', image_size=28, batch_size=10,
                  num_classes=10, channels=1, shape='recipe')
  # (round, framework, variant) -> CPU ms per step of 10 examples.
  cpu = {(0, 'bnfree_jax', 'group'): 10, (0, 'bnfree_jax', 'dp'): 16,
         (0, 'torch', 'group'): 8, (0, 'torch', 'dp'): 20,
         (1, 'bnfree_jax', 'group'): 12, (1, 'bnfree_jax', 'dp'): 18,
         (1, 'torch', 'group'): 8, (1, 'torch', 'dp'): 12,
         (2, 'bnfree_jax', 'group'): 10, (2, 'bnfree_jax', 'dp'): 17,
         (2, 'torch', 'group'): 9, (2, 'torch', 'dp'): 17}
  records = [dict(geometry, round=r, framework=f, variant=v, step_cpu_ms=ms, step_time_ms=ms,
                  device='cpu:test', jax_version='j', torch_version='t', opacus_version='o',
                  **({'ratio_to_nonprivate': ms / cpu[r, f, 'group']}
                     if (f, v) == ('bnfree_jax', 'dp') else {}))
             for (r, f, v), ms in cpu.items()]
  row = dp_vs_opacus.table(records).splitlines()[-1].strip('|').split(' | ')
  assert row[0].strip() == ('ResNet-10 GroupNorm, width 8, small stem, 28 px x 1, 10 classes, '
                            'batch 10')
  # Medians over the rounds: bnfree_jax DP 1.7 ms per example, Opacus's 1.7.
  assert row[2] == '1.70 (1.70)' and row[5] == '1.70 (1.70)'
  assert row[3] == '1.60'  # The median of 1.6, 1.5, 1.7.
  assert row[7] == '**1.00** (1.00)'
  # Per round 16/20, 18/12, 17/17: median 1.00, range 0.80-1.50.
  assert row[8].strip() == '1.00 (0.80-1.50)'
