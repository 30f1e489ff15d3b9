"""XLA:CPU settings, each in its own process (XLA reads its flags once, at
backend start), the processes taking turns round by round with a default one.
"""

import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

from bnfree_jax.bench import common
from bnfree_jax.logs import format_duration
from bnfree_jax.workdir import InputError

# The sweep's XLA:CPU settings: (label, environment, command prefix). Every
# flag here exists in jaxlib 0.10.2; an unknown one aborts the subprocess,
# which the sweep reports as a failed row.
CPU_FLAG_SETS = (
    ('default', {}, []),
    ('onednn custom call', {'XLA_FLAGS': '--xla_cpu_experimental_onednn_custom_call=true'}, []),
    ('onednn thunks', {'XLA_FLAGS': '--xla_cpu_use_onednn=true'}, []),
    ('vector width 512', {'XLA_FLAGS': '--xla_cpu_prefer_vector_width=512'}, []),
    ('xnn graph fusion', {'XLA_FLAGS': '--xla_cpu_experimental_xnn_graph_fusion_mode='
                          'XNN_GRAPH_FUSION_MODE_GREEDY'}, []),
    ('no eigen threads', {'XLA_FLAGS': '--xla_cpu_multi_thread_eigen=false'}, []),
    ('fast math', {'XLA_FLAGS': '--xla_cpu_enable_fast_math=true'}, []),
    # Convolutions on Eigen instead of YNNPACK, dots and reductions still on
    # YNNPACK: faster filter gradients (results/bench/cpu_gap.md).
    ('convs on Eigen', {'XLA_FLAGS': '--xla_cpu_experimental_ynn_fusion_type='
                        'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE'}, []),
    ('2 CPU devices', {'JAX_NUM_CPU_DEVICES': '2'}, []),
    ('1 core', {}, ['taskset', '-c', '0']),
)


class _Worker:
  """A train-step bench in its own process, under its own XLA flags, that
  does one phase (compile, then one round of steps) per 'go' on its stdin."""

  def __init__(self, args, label, env, prefix):
    self.label, self.error, self.records = label, None, []
    self.setting = ' '.join([*(f'{k}={v}' for k, v in env.items()), *prefix]) or '(none)'
    self.json = tempfile.NamedTemporaryFile(suffix='.json', delete=False).name
    self.log = tempfile.TemporaryFile(mode='w+')
    full_env = {**os.environ, **env}
    if 'XLA_FLAGS' in env and os.environ.get('XLA_FLAGS'):
      full_env['XLA_FLAGS'] = f"{os.environ['XLA_FLAGS']} {env['XLA_FLAGS']}"
    cmd = [*prefix, sys.executable, '-m', 'bnfree_jax.bench', '--lockstep',
           '--models', ','.join(args.models), '--variants', ','.join(args.variants),
           '--batch-size', str(args.batch_size), '--image-size', str(args.image_size),
           '--width', str(args.width), '--steps', str(args.steps), '--warmup', str(args.warmup),
           # Only when asked for: a --baseline checkout may predate --stem.
           *(['--stem', args.stem] if args.stem != 'imagenet' else []), '--json', self.json]
    self.proc = subprocess.Popen(cmd, env=full_env, cwd=common.REPO, text=True,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log)

  def wait_ready(self):
    """Blocks until the worker waits for its next 'go'; False if it died."""
    for line in self.proc.stdout:
      if line.strip() == _READY:
        return True
    self._fail()
    return False

  def go(self, last):
    try:
      self.proc.stdin.write('go\n')
      self.proc.stdin.flush()
    except BrokenPipeError:
      return self._fail()
    if not last:
      return self.wait_ready()
    self.proc.stdout.read()
    if self.proc.wait() != 0:
      return self._fail()
    with open(self.json) as f:
      self.records = json.load(f)
    os.unlink(self.json)
    return True

  def _fail(self):
    self.proc.wait()
    self.log.seek(0)
    tail = [line for line in self.log.read().splitlines() if line.strip()]
    self.error = f'rc={self.proc.returncode}: {tail[-1][:160] if tail else ""}'
    common.progress(f'  {self.label} failed: {self.error}')
    return False


_READY = '@bench-ready'


def lockstep_gate():
  """The worker's side of _Worker: say 'ready', then wait for 'go'."""
  print(_READY, flush=True)
  if not sys.stdin.readline():
    sys.exit(1)  # The parent is gone.


def sweep_cpu_flags(args, flag_sets, group_size=4):
  """Measures the train step under each setting, interleaved with a default
  run: XLA reads its flags once per process, so every setting gets its own
  process, and the processes take turns, one round of steps each, so a change
  in machine load (another job) hits a setting and its default alike. Settings
  go in groups of group_size, each with its own default, to bound memory."""
  default, others = flag_sets[0], list(flag_sets[1:])
  rows = []
  for g in range(0, len(others), group_size):
    group = [default, *others[g:g + group_size]]
    common.progress(f'group {g // group_size + 1}: {", ".join(label for label, _, _ in group)}')
    cpu_start = common.cpu_seconds()  # The workers count as this process's children.
    workers = [_Worker(args, *setting) for setting in group]
    alive = [w for w in workers if w.wait_ready()]
    phases = 1 + args.warmup + args.steps  # Compile, then one phase per round.
    t0 = time.perf_counter()
    for phase in range(phases):
      for w in (alive if phase % 2 == 0 else alive[::-1]):
        if not w.error:
          w.go(last=phase == phases - 1)
      if phase:
        left = (time.perf_counter() - t0) / (phase + 1) * (phases - 1 - phase)
        common.progress(f'  phase {phase + 1}/{phases} done, group ETA {format_duration(left)}')
    for w in workers:
      w.proc.wait()
    other_cores = common.other_cores(cpu_start, common.cpu_seconds())
    base = workers[0]
    for w in workers:
      rows.append(dict(label=w.label, setting=w.setting, error=w.error,
                       group=g // group_size, records=w.records, other_cpu_cores=other_cores,
                       ratios=_ratios(w.records, base.records)))
  return rows


def _ratios(records, base_records):
  """Per (model, variant): per-round step time ratios to the default run."""
  base = {(r['model'], r['variant']): r['step_times_ms'] for r in base_records}
  return {f"{r['model']} {r['variant']}": [t / b for t, b in zip(r['step_times_ms'],
                                                                 base[r['model'], r['variant']])]
          for r in records if (r['model'], r['variant']) in base}


def sweep_table(rows, threshold=0.03):
  """Each setting's step time relative to the default run of its group: the
  median and quartiles of per-round ratios. A setting helps when the median is
  more than 3% faster and three rounds in four are faster, on every variant."""
  keys = list(next(row['ratios'] for row in rows if not row['error']))
  lines = [f'Step time relative to the default run of the same group, median '
           f'(quartiles) of per-round ratios; {len(rows[0]["records"][0]["step_times_ms"])} '
           'rounds, settings take turns within a round.', '',
           f"| setting | environment | {' | '.join(f'{k} ms | {k} ratio' for k in keys)} "
           '| compile s | load avg | other cores busy | verdict |',
           '|---|---|' + '---|---|' * len(keys) + '---|---|---|---|']
  for row in rows:
    if row['error'] or not row['ratios']:
      lines.append(f"| {row['label']} | {row['setting']} | " + ' | '.join(['—'] * 2 * len(keys))
                   + f" | — | — | — | failed: {row['error']} |")
      continue
    cells, verdicts = [], []
    for key in keys:
      ratios = row['ratios'][key]
      median = statistics.median(ratios)
      q1, q3 = statistics.quantiles(ratios, n=4)[::2] if len(ratios) > 1 else (median, median)
      ms = next(r['step_time_ms'] for r in row['records'] if f"{r['model']} {r['variant']}" == key)
      cells.append(f'{ms:.0f} | {median:.2f} ({q1:.2f}–{q3:.2f})')
      verdicts.append('helps' if median < 1 - threshold and q3 < 1 else
                      'hurts' if median > 1 + threshold and q1 > 1 else 'no clear effect')
    verdict = verdicts[0] if len(set(verdicts)) == 1 else 'mixed: ' + ', '.join(verdicts)
    if row['label'] == 'default':
      verdict = f"baseline of group {row['group'] + 1}"
    compile_s = sum(r['compile_s'] for r in row['records'])
    r0 = row['records'][0]
    lines.append(f"| {row['label']} | {row['setting']} | {' | '.join(cells)} | {compile_s:.0f} | "
                 f"{r0['load_avg_start']:.1f}–{r0['load_avg_end']:.1f} | "
                 f"{common.cores(row['other_cpu_cores'])} | {verdict} |")
  return '\n'.join(lines) + '\n'


def against_baseline(checkout, flag_sets):
  """The default setting run by the code of another checkout, then this
  checkout's code with no setting, then flag_sets."""
  if not os.path.isfile(os.path.join(checkout, 'bnfree_jax', 'bench', '__main__.py')):
    raise InputError(f'--baseline {checkout!r} is not a bnfree_jax checkout (it has no '
                     'bnfree_jax/bench/__main__.py)')
  # `python -m bnfree_jax.bench` imports the package from its working directory.
  return (('default', {}, ['env', '-C', os.path.abspath(checkout)]),
          ('this checkout', {}, []), *flag_sets)


def parse_flag_sets(text):
  """--cpu-flags='--xla_a=1;NAME=2 --xla_b=3' -> the default setting and one
  per ';'-separated item."""
  return (CPU_FLAG_SETS[0], *(_flag_set(f) for f in text.split(';') if f.strip()))


def _flag_set(text):
  """'--xla_a=1 NAME=V' -> (label, {'XLA_FLAGS': '--xla_a=1', 'NAME': 'V'}, [])."""
  env, flags = {}, []
  for token in shlex.split(text):
    if token.startswith('--'):
      flags.append(token)
    elif '=' in token:
      name, value = token.split('=', 1)
      env[name] = value
    else:
      raise InputError(f'--cpu-flags item {token!r} is neither --xla_flag=value nor NAME=value')
  if flags:
    env['XLA_FLAGS'] = ' '.join(flags)
  return text.strip(), env, []
