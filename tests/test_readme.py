"""README's and docs/'s result tables say what the committed reports under
results/ say: every number of theirs is looked up in its report; and every
page of docs/ is linked from README, every link there leading to a file."""

import json
import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
README = (REPO / 'README.md').read_text()


def markdown_tables(text):
  """Every markdown table of text as a list of {header: cell} rows."""
  tables, rows = [], []
  for line in text.splitlines() + ['']:
    if line.startswith('|'):
      rows.append([cell.strip() for cell in line.strip().strip('|').split('|')])
    elif rows:
      head, body = rows[0], [r for r in rows[1:] if not set(''.join(r)) <= set('-: ')]
      tables.append([dict(zip(head, r)) for r in body])
      rows = []
  return tables


def readme_table(header, page='README.md'):
  """The one table of README (or of another page) with this header, as
  {first cell: row}."""
  table, = (t for t in markdown_tables((REPO / page).read_text()) if t and header in t[0])
  return {next(iter(row.values())): row for row in table}


def report_finals(path):
  """{run: (final train top-1, final val top-1)} of a report.md, as printed."""
  table = next(t for t in markdown_tables((REPO / path).read_text())
               if t and 'val top-1 final / best' in t[0])
  return {row['run']: (row['train top-1 final / best'].split(' / ')[0],
                       row['val top-1 final / best'].split(' / ')[0]) for row in table}


def assert_gap(cell, train, test, what):
  """A README gap cell is its report's final train minus test top-1, to rounding."""
  assert float(cell) == pytest.approx(float(train) - float(test), abs=0.006), what


def test_paper_twins_table_equals_its_report():
  report = report_finals('results/paper_small/report.md')
  rows = readme_table('row (LR)', 'docs/reproducing.md')
  runs = {'BN (0.1)': 't1_bn_small',
          'no norm + constant clipping at 5 (0.001)': 't1_constant_clip_small',
          'WN (0.001)': 't1_wn_small',
          'WN + adaptive clipping (0.01)': 't2_wn_clip_lr0p01_small',
          'WN + adaptive clipping + dropout (0.01)': 't2_wn_clip_dropout_lr0p01_small'}
  runs.update({label: 'f3_unnormalized_small' for label in rows
               if label.startswith('no normalization at all')})
  assert set(runs) == set(rows)
  for label, run in runs.items():
    train, val = report[run]
    assert (rows[label]['train top-1'], rows[label]['test top-1'].strip('*')) == (train, val), label


def test_nf_twin_table_equals_its_report():
  report = report_finals('results/nf_twin/report.md')
  rows = readme_table('twin', 'docs/nf_resnets.md')
  prefixes = {'BN': 'bn_seed', 'the paper': 'wn_clip_seed', 'NF-ResNet': 'nf_seed'}
  assert len(rows) == len(prefixes)
  for label, row in rows.items():
    run, = (p for start, p in prefixes.items() if label.startswith(start))
    seeds = [float(report[f'{run}{s}'][1]) for s in (0, 1)]
    assert [float(row['seed 0']), float(row['seed 1'])] == seeds, label
    # The mean is rounded to 2 digits.
    assert float(row['mean']) == pytest.approx(sum(seeds) / 2, abs=0.0051), label


def test_small_batch_table_equals_its_report():
  report = report_finals('results/small_batch/report.md')
  rows = readme_table('batch 8', 'docs/nf_resnets.md')
  runs = [('BN, statistics over the global batch', 'b128_bn', 'b8_bn'),
          ('BN, statistics per device', None, 'b8_bn_per_device'),
          ('the same, 4 devices', None, 'b8_bn_per_device_4dev'),
          ("the paper's WN", 'b128_wn_clip', 'b8_wn_clip'),
          ('NF-ResNet', 'b128_nf', 'b8_nf')]
  assert len(rows) == len(runs)
  for start, b128, b8 in runs:
    row, = (row for label, row in rows.items() if label.startswith(start))
    assert row['batch 128'] == (report[b128][1] if b128 else '—'), start
    assert row['batch 8'] == report[b8][1], start


def test_low_data_table_equals_its_report():
  report = report_finals('results/paper_lowdata/report.md')
  rows = readme_table('low-data row (LR)', 'docs/reproducing.md')
  runs = ['t1_bn', 't1_wn', 't1_constant_clip', 't2_wn_clip_lr0p001', 't2_wn_clip_lr0p01',
          't2_wn_clip_dropout_lr0p01', 't3_clip10', 't4_step_lr0p001', 't4_cyclic_lr0p001',
          't4_cyclic_lr0p01', 't5_warmup_momentum', 'f3_unnormalized', 't6_r34_bn',
          't6_r34_wn_monotonic', 't6_r34_wn_warmup', 't6_r50_bn', 't6_r50_wn_monotonic',
          't6_r50_wn_warmup']
  assert len(rows) == len(runs)
  for row, run in zip(rows.values(), runs):
    train, test = report[f'{run}_lowdata']
    assert (row['train top-1'], row['test top-1']) == (train, test), run
    assert_gap(row['train − test'], train, test, run)


def test_weight_decay_table_equals_its_reports():
  reports = {'all': report_finals('results/paper_lowdata/report.md'),
             'kernels': report_finals('results/paper_lowdata_wd_kernels/report.md')}
  rows = readme_table('WN row, weight decay on (LR)', 'docs/reproducing.md')
  runs = ['t1_wn', 't2_wn_clip_lr0p001', 't2_wn_clip_lr0p01', 't2_wn_clip_dropout_lr0p01',
          't5_warmup_momentum']
  assert len(rows) == len(runs)
  for row, run in zip(rows.values(), runs):
    for on, report in reports.items():
      train, test = report[f'{run}_lowdata']
      assert row[f'{on}: test top-1'] == test, (run, on)
      assert_gap(row[f'{on}: train − test'], train, test, (run, on))


def test_results_table_equals_the_reports():
  rows = readme_table('BN-free row')
  small = report_finals('results/paper_small/report.md')
  lowdata = report_finals('results/paper_lowdata/report.md')
  nf_twin = report_finals('results/nf_twin/report.md')
  small_batch = report_finals('results/small_batch/report.md')
  dp = report_finals('results/dp/report.md')
  dp_ws = report_finals('results/dp/group_ws/report.md')
  dp_linear = report_finals('results/dp/linear/report.md')

  def mean(run, report=nf_twin):  # Of seeds 0 and 1, as README rounds it.
    return f'{(float(report[run + "0"][1]) + float(report[run + "1"][1])) / 2:.2f}'

  want = {'the paper': (small['t1_bn_small'][1], small['t2_wn_clip_lr0p01_small'][1]),
          'low-data': (lowdata['t1_bn_lowdata'][1], lowdata['t2_wn_clip_lr0p01_lowdata'][1]),
          'normalizer-free': (mean('bn_seed'), mean('nf_seed')),
          'global batch 8': (small_batch['b8_bn'][1], small_batch['b8_nf'][1]),
          # Batch norm cannot be trained with DP-SGD: its row has no BN number.
          'DP-SGD at ε = 3, δ = 1e-5 (full data, 6': ('—', mean('eps3_seed', dp)),
          'DP-SGD at ε = 3, δ = 1e-5 (full data, 30 epochs), mean': ('—', mean('eps3_e30_seed', dp)),
          'DP-SGD at ε = 3, δ = 1e-5 (full data, 30 epochs), weight': (
              '—', mean('ws_e30_seed', dp_ws)),
          'DP-SGD at ε = 3, δ = 1e-5 (full data, 30 epochs), the recipe': (
              '—', mean('r10_e30_seed', dp_ws)),
          'DP-SGD at ε = 3, δ = 1e-5 (full data, 40 epochs), ScatterNet + linear, mean': (
              '—', mean('linear_e40_seed', dp_linear)),
          'DP-SGD at ε = 3, δ = 1e-5 (full data, 40 epochs), ScatterNet + linear on': (
              '—', mean('linear_centered_e40_seed', dp_linear)),
          'DP-SGD at ε = 3, δ = 1e-5 (full data, 40 epochs), ScatterNet + linear at': (
              '—', mean('linear_scatter12_e40_seed', dp_linear)),
          'DP-SGD at ε = 1,': ('—', dp_ws['r10_e30_eps1'][1]),
          'DP-SGD at ε = 8,': ('—', dp_ws['r10_e30_eps8'][1])}
  assert len(rows) == len(want)
  for start, (bn, bn_free) in want.items():
    row, = (row for label, row in rows.items() if label.startswith(start))
    assert (row['BN'], row['BN-free']) == (bn, bn_free), start
  bench = markdown_tables((REPO / 'results/bench/train_step_resnet18.md').read_text())[0]
  weight, = (r for r in bench if r['variant'] == 'weight')
  ratio = weight['× batch: median (quartiles) of per-round ratios'].split()[0]
  assert f'takes {ratio}x BN\'s time' in ' '.join(README.split())


def test_every_docs_page_is_listed_in_readme_and_every_link_resolves():
  pages = sorted((REPO / 'docs').glob('*.md'))
  assert set(readme_table('page')) == {f'[docs/{p.name}](docs/{p.name})' for p in pages}
  for page in [REPO / 'README.md', *pages]:
    for target in re.findall(r'\]\(([^)#]+)[^)]*\)', page.read_text()):
      assert '://' in target or (page.parent / target).exists(), (page.name, target)


def test_lr_find_table_equals_its_sweeps():
  rows = readme_table('lowest loss')
  assert len(rows) == 5
  for label, row in rows.items():
    result = json.loads((REPO / 'results/lr_find' / label.strip('`').split(':')[0]
                         / 'lr_find.json').read_text())
    for column, key in (('steepest', 'steepest'), ('lowest loss', 'largest'),
                        ('diverged at', 'diverged_at')):
      assert row[column] == f'{result[key]:.2g}', (label, column)


def test_dp_speed_sentence_and_table_equal_the_bench():
  """README's DP-SGD speed sentence and docs/privacy.md's speed table say
  what the committed dp_vs_opacus tables say."""
  bench = {}
  for name in ('dp_vs_opacus_recipe_r10_amd', 'dp_vs_opacus_imagenet'):
    row, = markdown_tables((REPO / 'results' / 'bench' / f'{name}.md').read_text())[0]
    bench[name] = (row['bnfree_jax dp ÷ group'],
                   row['bnfree_jax dp ÷ Opacus dp, CPU (wall)'].split('**')[1])
  ratio, opacus = bench['dp_vs_opacus_recipe_r10_amd']
  assert (f"recipe's ResNet-10 takes {ratio}x its non-private step and {opacus}x Opacus's"
          in ' '.join(README.split()))
  docs = readme_table('bnfree_jax DP ÷ Opacus DP', 'docs/privacy.md')
  for name, prefix in (('dp_vs_opacus_recipe_r10_amd', 'ResNet-10'),
                       ('dp_vs_opacus_imagenet', 'ResNet-18')):
    row, = (r for first, r in docs.items() if first.startswith(prefix))
    assert (row['bnfree_jax DP ÷ plain'], row['bnfree_jax DP ÷ Opacus DP']) == bench[name]
