"""Benchmarks: the paper's Table 7 (time and memory per normalization) under XLA.

Train step, one table row per model and variant, all variants interleaved in
one process so that their ratios share the machine's state:

  python -m bnfree_jax.bench --models resnet18,resnet50 \
      --variants batch,weight,weight_clip,weight_clip_dropout,none \
      --batch-size 16 --image-size 224 --steps 10 --json OUT.json [--md OUT.md]

A variant is a base (the rows of Table 7, plus 'none') with optional memory
options appended: `weight+remat`, `batch+bf16`, `weight+remat+bf16`.
`--memory-options` adds V+remat and V+bf16 for every variant V given;
`--remat` and `--compute-dtype bfloat16` append the option to all of them.

Input pipeline alone (images/s), beside the train step's consumption:

  python -m bnfree_jax.bench --input imagenet,fashion_mnist --batch-size 128 --seconds 20

XLA:CPU settings, each in its own process (XLA reads its flags once, at
backend start), the processes taking turns round by round with a default one:

  python -m bnfree_jax.bench --sweep-cpu-flags --steps 8 \
      [--cpu-flags='--xla_cpu_use_onednn=true;JAX_NUM_CPU_DEVICES=2']

On a CPU host the step runs on one CPU device per core, as in the trainer
(runtime.use_cpu_cores); JAX_NUM_CPU_DEVICES=1 measures a single device.

Records carry the load average and the cores other processes kept busy: on a
shared machine, read a ratio beside those.

Exit codes: 0 done; 2 bad input, reported in one line naming the allowed values.
"""

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import pathlib
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

# TF serves input only: silence its start-up chatter (as bnfree_jax.main does).
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

from bnfree_jax import runtime  # noqa: E402
from bnfree_jax.workdir import EXIT_BAD_INPUT, InputError  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]

# Table 7's rows (vanilla; non-BN; + adaptive clipping; + dropout) and the
# unnormalized network. Learning rates are the paper's for each row (Tables 1,
# 5, Fig. 3a); they do not change the work per step, but keep the steps finite
# (ResNet-50 WN without clipping diverges at 0.017, and NaNs are no benchmark).
VARIANTS = {
    'batch': dict(norm='batch', base_lr=0.1),
    'weight': dict(norm='weight', base_lr=0.001),
    'weight_clip': dict(norm='weight', base_lr=0.017, clip=True),
    'weight_clip_dropout': dict(norm='weight', base_lr=0.017, clip=True, dropout_rate=0.1),
    'none': dict(norm='none', base_lr=1e-5),
}
# Memory options: suffix -> (config key, value).
OPTIONS = {'remat': ('remat', True), 'bf16': ('compute_dtype', 'bfloat16')}
INPUTS = ('imagenet', 'fashion_mnist')

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
    ('2 CPU devices', {'JAX_NUM_CPU_DEVICES': '2'}, []),
    ('1 core', {}, ['taskset', '-c', '0']),
)


def _progress(message):
  print(f'[bench] {message}', file=sys.stderr, flush=True)


def _duration(seconds):
  seconds = int(seconds)
  return f'{seconds // 60}m{seconds % 60:02d}s'


def _split(text):
  return [item.strip() for item in text.split(',') if item.strip()]


def _load_config(name):
  """get_config() of configs/NAME.py, loaded by path as the CLI and tests do."""
  if str(REPO) not in sys.path:  # Recipes import `from configs import ...`.
    sys.path.insert(0, str(REPO))
  path = REPO / 'configs' / f'{name}.py'
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _machine():
  """What every record carries so figures from different runs can be compared."""
  import jax
  import jaxlib
  device = jax.devices()[0]
  return dict(device=f'{device.platform}:{device.device_kind} x{jax.device_count()}',
              jax_version=jax.__version__, jaxlib_version=jaxlib.__version__,
              xla_flags=os.environ.get('XLA_FLAGS', ''), cpu_count=os.cpu_count(),
              host=platform.node())


# ------------------------------------------------------------ variants ----


def parse_variants(names, memory_options=False, remat=False, compute_dtype='float32'):
  """Variant names, validated and expanded ('weight' -> 'weight+remat', ...)."""
  if compute_dtype not in ('float32', 'bfloat16'):
    raise InputError(f'--compute-dtype {compute_dtype!r} is not one of: float32, bfloat16')
  if not names:
    raise InputError(f'--variants is empty; allowed: {", ".join(VARIANTS)}')
  out = []
  for name in names:
    base, *options = name.split('+')
    if base not in VARIANTS or any(o not in OPTIONS for o in options):
      raise InputError(f'unknown variant {name!r}; allowed: {", ".join(VARIANTS)}, '
                       f'each optionally followed by {" and/or ".join("+" + o for o in OPTIONS)}')
    options += [o for o, on in (('remat', remat), ('bf16', compute_dtype == 'bfloat16'))
                if on and o not in options]
    expanded = [options]
    if memory_options:
      expanded += [options + [o] for o in OPTIONS if o not in options]
    for opts in expanded:
      label = '+'.join([base, *opts])
      if label not in out:
        out.append(label)
  return out


def parse_models(names):
  from bnfree_jax import models
  if not names:
    raise InputError(f'--models is empty; allowed: {", ".join(models.MODELS)}')
  for name in names:
    if name not in models.MODELS:
      raise InputError(f'unknown model {name!r}; allowed: {", ".join(models.MODELS)}')
  return names


def variant_config(model, variant, batch_size, image_size, width):
  """The trainer's config for one table row, on in-memory synthetic data."""
  base, *options = variant.split('+')
  spec = VARIANTS[base]
  c = _load_config('default')
  c.dataset = 'synthetic'
  # setup() only reads these numbers; the bench feeds its own batch, so the
  # synthetic images themselves are never generated.
  c.synthetic.update(image_size=image_size, channels=3, num_classes=1000,
                     num_train=max(1024, batch_size), num_eval=batch_size)
  c.batch_size = batch_size
  c.num_train_steps = 10_000  # Only shapes the schedules.
  c.model.update(name=model, norm=spec['norm'], width=width, stem='imagenet',
                 dropout_rate=spec.get('dropout_rate', 0.0))
  c.lr_schedule.base_lr = spec['base_lr']
  if spec.get('clip'):  # The paper's adaptive clipping, as in resnet18_wn.py.
    c.grad_clip.update(mode='log', threshold=5.0, final_threshold=50.0)
  for option in options:
    key, value = OPTIONS[option]
    c[key] = value
  return c


# ----------------------------------------------------------- train step ----


@dataclasses.dataclass
class _Run:
  """One row being measured: its compiled step, live state and timings."""
  model: str
  variant: str
  config: object
  compiled: object = None
  state: object = None
  batch: object = None
  record: dict = dataclasses.field(default_factory=dict)
  times: list = dataclasses.field(default_factory=list)
  finite: bool = True


def _cost_flops(compiled):
  # cost_analysis() is a dict in current JAX and a list of one dict per
  # computation in older releases; either may be empty on some backends.
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  flops = (cost or {}).get('flops')
  return float(flops) if flops is not None and flops > 0 else None


def _memory(compiled):
  m = compiled.memory_analysis()
  if m is None:
    return {}
  # (peak_memory_in_bytes is left out: XLA:CPU reports the arguments' size there.)
  return dict(temp_bytes=m.temp_size_in_bytes, argument_bytes=m.argument_size_in_bytes,
              output_bytes=m.output_size_in_bytes, alias_bytes=m.alias_size_in_bytes)


def _prepare(run):
  """setup + init + AOT compile of exactly the step the trainer runs."""
  import jax
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P
  from bnfree_jax import train

  s = train.setup(run.config)
  run.state = train.init_state(s)
  rng, n = np.random.default_rng(0), run.config.batch_size
  batch = {'image': rng.normal(size=(n, *s.info.image_shape)).astype(np.float32),
           'label': rng.integers(s.info.num_classes, size=n).astype(np.int32)}
  run.batch = jax.device_put(batch, NamedSharding(s.mesh, P('data')))
  t0 = time.perf_counter()
  run.compiled = train.jit_train_step(s).lower(run.state, run.batch).compile()
  # Both analyses describe the partitioned program of one device: FLOPs add
  # up over the mesh, memory is what each device needs.
  num_devices = s.mesh.devices.size
  flops = _cost_flops(run.compiled)
  run.record.update(compile_s=time.perf_counter() - t0, num_devices=num_devices,
                    flops_per_step=flops * num_devices if flops else None,
                    **_memory(run.compiled))


def _device_peak():
  import jax
  stats = jax.local_devices()[0].memory_stats()  # None on CPU.
  return stats if stats and 'peak_bytes_in_use' in stats else None


def _step(run):
  import jax
  t0 = time.perf_counter()
  # The state is donated: its buffers become the new state's, so feed it back.
  run.state, _, finite = run.compiled(run.state, run.batch)
  jax.block_until_ready(run.state)
  run.finite &= bool(finite)
  return time.perf_counter() - t0


def _cpu_seconds():
  """(wall, CPU seconds all cores were busy, CPU seconds of this process) so
  far, or None where /proc/stat is missing (not Linux)."""
  try:
    with open('/proc/stat') as f:
      jiffies = [int(x) for x in f.readline().split()[1:]]
  except OSError:
    return None
  busy = (sum(jiffies) - jiffies[3] - jiffies[4]) / os.sysconf('SC_CLK_TCK')  # Not idle, iowait.
  t = os.times()
  return time.time(), busy, t.user + t.system + t.children_user + t.children_system


def _other_cores(start, end):
  """Cores that other processes kept busy on average between two _cpu_seconds():
  the load average counts the bench itself, this does not."""
  if not (start and end) or end[0] <= start[0]:
    return None
  return max(0.0, ((end[1] - start[1]) - (end[2] - start[2])) / (end[0] - start[0]))


def measure_steps(runs, steps, warmup, gate=lambda: None):
  """Compiles every run, then times them round-robin: round r steps every run
  once, so drifting machine load hits all variants alike. Fills run.record.
  gate() is called before the compilations and before each round."""
  gate()
  load_start = os.getloadavg()
  for i, run in enumerate(runs):
    _progress(f'compiling {i + 1}/{len(runs)}: {run.model} {run.variant}')
    _prepare(run)

  # Device peak (GPU): the allocator's peak never resets, so each run's first
  # step goes in order of the compiler's footprint estimate, and the other
  # runs' resident buffers are subtracted. CPU keeps no statistics: n/a.
  footprint = lambda r: r.record.get('argument_bytes', 0) + r.record.get('temp_bytes', 0)
  gate()
  for run in sorted(runs, key=footprint):
    before = _device_peak()
    run.times.append(_step(run))
    after = _device_peak()
    run.record['peak_bytes'] = None
    if before and after and after['peak_bytes_in_use'] > before['peak_bytes_in_use']:
      others = before['bytes_in_use'] - run.record.get('argument_bytes', 0)
      run.record['peak_bytes'] = after['peak_bytes_in_use'] - others

  rounds = warmup + steps
  cpu_start = _cpu_seconds()
  t0 = time.perf_counter()
  for r in range(1, rounds):  # Round 0 was the first step above.
    gate()
    # Alternate the order, so no variant always follows the same neighbour.
    for run in (runs if r % 2 else runs[::-1]):
      run.times.append(_step(run))
    per_round = (time.perf_counter() - t0) / r
    _progress(f'step {r + 1}/{rounds} ({"warm-up" if r < warmup else "timed"}) '
              f'of {len(runs)} variants, ETA {_duration(per_round * (rounds - 1 - r))}')

  load_end = os.getloadavg()
  other_cores = _other_cores(cpu_start, _cpu_seconds())
  machine = _machine()
  for run in runs:
    timed = run.times[warmup:]
    median = statistics.median(timed)
    c = run.config
    flops = run.record.get('flops_per_step')
    run.record.update(
        model=run.model, variant=run.variant, norm=c.model.norm, remat=bool(c.remat),
        compute_dtype=c.compute_dtype, dropout_rate=c.model.dropout_rate,
        grad_clip=c.grad_clip.mode, width=c.model.width, batch_size=c.batch_size,
        image_size=c.synthetic.image_size if c.dataset == 'synthetic' else None,
        dataset=c.dataset, steps=len(timed), warmup=warmup,
        step_time_ms=1e3 * median, step_time_ms_min=1e3 * min(timed),
        step_time_ms_max=1e3 * max(timed), step_times_ms=[1e3 * t for t in timed],
        images_per_sec=c.batch_size / median,
        flops_per_sec=flops / median if flops else None, all_finite=run.finite,
        load_avg_start=load_start[0], load_avg_end=load_end[0], other_cpu_cores=other_cores,
        **machine)
    # Free device memory before the next table is measured.
    run.compiled = run.state = run.batch = None
  for run in runs:
    # The median of per-round ratios: both steps of a round ran seconds apart,
    # so a load change between rounds (another job) cancels out.
    base = next((r for r in runs if r.model == run.model and r.variant == 'batch'), None)
    run.record['ratio_to_batch'] = run.record['ratio_to_batch_quartiles'] = None
    if base:
      ratios = [t / b for t, b in zip(run.record['step_times_ms'], base.record['step_times_ms'])]
      run.record['ratio_to_batch'] = statistics.median(ratios)
      # Their spread says how far the median ratio can be trusted.
      run.record['ratio_to_batch_quartiles'] = (
          statistics.quantiles(ratios, n=4)[::2] if len(ratios) > 1 else [ratios[0]] * 2)
  return [run.record for run in runs]


def _cores(value):
  return 'n/a' if value is None else f'{value:.2f}'


def _mb(value):
  return 'n/a' if value is None else f'{value / 2**20:.0f}'


def markdown_table(records):
  """Table 7's layout: one row per model and variant."""
  if not records:
    return ''
  first = records[0]
  lines = [
      f"Train step, batch {first['batch_size']}, {first['image_size']} px, "
      f"median of {first['steps']} timed steps after {first['warmup']} warm-up, "
      f"variants interleaved. {first['device']}, jax {first['jax_version']}, "
      f"XLA_FLAGS={first['xla_flags'] or '(none)'}, load average "
      f"{first['load_avg_start']:.2f} -> {first['load_avg_end']:.2f} on "
      f"{first['cpu_count']} CPUs (the bench included); other processes kept "
      f"{_cores(first['other_cpu_cores'])} cores busy while the steps ran.", '',
      '| model | variant | step ms median [min–max] | img/s | × batch: median (quartiles) of '
      'per-round ratios | compile s | GFLOPs/step | GFLOP/s | temp MB/device '
      '| argument MB/device | peak MB |',
      '|---|---|---|---|---|---|---|---|---|---|---|']
  for r in records:
    ratio = '—'
    if r['ratio_to_batch'] is not None:
      q1, q3 = r['ratio_to_batch_quartiles']
      ratio = f"{r['ratio_to_batch']:.2f} ({q1:.2f}–{q3:.2f})"
    gflops = '—' if r['flops_per_step'] is None else f"{r['flops_per_step'] / 1e9:.3g}"
    rate = '—' if r['flops_per_sec'] is None else f"{r['flops_per_sec'] / 1e9:.3g}"
    finite = '' if r['all_finite'] else ' (non-finite loss)'
    lines.append(
        f"| {r['model']} | {r['variant']}{finite} | {r['step_time_ms']:.0f} "
        f"[{r['step_time_ms_min']:.0f}–{r['step_time_ms_max']:.0f}] | "
        f"{r['images_per_sec']:.1f} | {ratio} | {r['compile_s']:.1f} | {gflops} | {rate} | "
        f"{_mb(r.get('temp_bytes'))} | {_mb(r.get('argument_bytes'))} | "
        f"{_mb(r.get('peak_bytes'))} |")
  return '\n'.join(lines) + '\n'


# ------------------------------------------------------- input pipeline ----


def _jpeg_records(num_jpegs, seed=0):
  """A tfds-style as_dataset_fn over generated 500x375 JPEGs (ImageNet's
  typical size). Smooth random shapes plus noise compress to ~100 KB, close
  to ImageNet's average file, so decoding costs what it would on real data."""
  import numpy as np
  import tensorflow as tf

  rng = np.random.default_rng(seed)
  jpegs = []
  for _ in range(num_jpegs):
    low = rng.uniform(0, 255, (1, 12, 16, 3)).astype(np.float32)
    image = tf.image.resize(low, (375, 500), 'bicubic')[0] + rng.normal(0, 20, (375, 500, 3))
    jpegs.append(tf.io.encode_jpeg(tf.cast(tf.clip_by_value(image, 0, 255), tf.uint8),
                                   quality=90).numpy())
  mean_kb = float(np.mean([len(j) for j in jpegs])) / 1e3
  table = tf.constant(jpegs)

  # Many more records than files, so epochs are long, as on ImageNet; a record
  # is its file's bytes, as under tfds' SkipDecoding.
  @tf.autograph.experimental.do_not_convert
  def record(i):
    return {'image': tf.gather(table, i % num_jpegs), 'label': i % 1000}

  def as_dataset_fn(builder, split, **kwargs):
    del builder, kwargs
    n = 1_281_167 if split == 'train' else 50_000
    return tf.data.Dataset.range(n).map(record)
  return as_dataset_fn, mean_kb


def measure_input(name, batch_size, seconds, num_jpegs=256):
  """Images/s of input_pipeline.train_batches alone, after two batches of
  start-up (file reading, tf.data threads)."""
  import tensorflow_datasets as tfds
  from bnfree_jax import input_pipeline

  if name == 'imagenet':
    config = _load_config('resnet18_wn')  # imagenet2012: decode, inception crop, flip.
    as_dataset_fn, mean_kb = _jpeg_records(num_jpegs)
    source = (f'{num_jpegs} generated 500x375 JPEGs (mean {mean_kb:.0f} KB) through '
              'tfds.testing.mock_data')
    context = tfds.testing.mock_data(as_dataset_fn=as_dataset_fn)
  else:
    config = _load_config('fashion_mnist')
    source = 'IDX files' if input_pipeline._tfds_split(config, True) is None else 'tfds copy'
    context = contextlib.nullcontext()
  config.batch_size = batch_size
  with context:
    batches = input_pipeline.train_batches(config, start_step=0, local_batch_size=batch_size,
                                           process_index=0, process_count=1)
    for _ in range(2):
      batch = next(batches)
    count, t0, cpu_start = 0, time.perf_counter(), _cpu_seconds()
    while time.perf_counter() - t0 < seconds:
      next(batches)
      count += 1
    elapsed = time.perf_counter() - t0
    other_cores = _other_cores(cpu_start, _cpu_seconds())
  return dict(input=name, dataset=config.dataset, source=source, batch_size=batch_size,
              image_shape=list(batch['image'].shape[1:]), batches=count,
              seconds=elapsed, images_per_sec=count * batch_size / elapsed,
              load_avg=os.getloadavg()[0], other_cpu_cores=other_cores)


def _consumption(name, batch_size, image_size, steps_json):
  """The train step's images/s on the matching model: from a previous bench
  JSON when given (imagenet), else measured here with a short run."""
  if name == 'imagenet' and steps_json:
    with open(steps_json) as f:
      records = [r for r in json.load(f) if r['model'] == 'resnet18'
                 and r['image_size'] == image_size and r['dataset'] == 'synthetic']
    pick = max(records, key=lambda r: r['images_per_sec'])  # The most demanding variant.
    return dict(what=f"resnet18 {pick['variant']}, batch {pick['batch_size']}, "
                f"from {steps_json}", images_per_sec=pick['images_per_sec'])
  if name == 'imagenet':
    config = variant_config('resnet18', 'weight_clip_dropout', batch_size, image_size, 64)
    what = f'resnet18 weight_clip_dropout, batch {batch_size}, {image_size} px'
  else:
    config = _load_config('fashion_mnist')
    config.batch_size = batch_size
    what = (f'configs/fashion_mnist.py ({config.model.name} width {config.model.width}, '
            f'{config.model.stem} stem), batch {batch_size}')
  record, = measure_steps([_Run(config.model.name, name, config)], steps=3, warmup=1)
  return dict(what=what + ' (measured now)', images_per_sec=record['images_per_sec'])


def input_table(rows):
  lines = ['| input | source | batch | pipeline img/s | train step consumes img/s '
           '| headroom | load avg | other cores busy |', '|---|---|---|---|---|---|---|---|']
  for r in rows:
    lines.append(
        f"| {r['input']} | {r['source']} | {r['batch_size']} | {r['images_per_sec']:.0f} | "
        f"{r['consumption_images_per_sec']:.1f} ({r['consumption']}) | "
        f"{r['images_per_sec'] / r['consumption_images_per_sec']:.1f}x | {r['load_avg']:.2f} | "
        f"{_cores(r['other_cpu_cores'])} |")
  return '\n'.join(lines) + '\n'


# -------------------------------------------------------- CPU flag sweep ----


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
           '--json', self.json]
    self.proc = subprocess.Popen(cmd, env=full_env, cwd=REPO, text=True, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=self.log)

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
    _progress(f'  {self.label} failed: {self.error}')
    return False


_READY = '@bench-ready'


def _lockstep_gate():
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
    _progress(f'group {g // group_size + 1}: {", ".join(label for label, _, _ in group)}')
    cpu_start = _cpu_seconds()  # The workers count as this process's children.
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
        _progress(f'  phase {phase + 1}/{phases} done, group ETA {_duration(left)}')
    for w in workers:
      w.proc.wait()
    other_cores = _other_cores(cpu_start, _cpu_seconds())
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
                 f"{_cores(row['other_cpu_cores'])} | {verdict} |")
  return '\n'.join(lines) + '\n'


# ------------------------------------------------------------------ main ----


def _parser():
  p = argparse.ArgumentParser(prog='python -m bnfree_jax.bench', description=__doc__.split('\n')[0])
  p.add_argument('--models', default='resnet18', help='comma-separated, e.g. resnet18,resnet50')
  p.add_argument('--variants', default=None,
                 help=f'comma-separated from {", ".join(VARIANTS)}, each optionally '
                 '+remat and/or +bf16 (default: all; batch,weight for the sweep)')
  p.add_argument('--memory-options', action='store_true',
                 help='add V+remat and V+bf16 rows for every variant V')
  p.add_argument('--remat', action='store_true', help='append +remat to every variant')
  p.add_argument('--compute-dtype', default='float32', help='float32 | bfloat16 (all variants)')
  p.add_argument('--batch-size', type=int, default=None, help='16 (train step), 128 (--input)')
  p.add_argument('--image-size', type=int, default=224)
  p.add_argument('--width', type=int, default=64, help='channels of the first stage')
  p.add_argument('--steps', type=int, default=10, help='timed steps per variant')
  p.add_argument('--warmup', type=int, default=2, help='untimed steps per variant')
  p.add_argument('--json', help='write the records here')
  p.add_argument('--md', help='write the printed markdown here')
  p.add_argument('--input', help=f'benchmark the input pipeline of: {",".join(INPUTS)}')
  p.add_argument('--seconds', type=float, default=20.0, help='per input pipeline')
  p.add_argument('--steps-json', help='(--input) take the train step consumption from '
                 'this bench JSON instead of measuring it')
  p.add_argument('--sweep-cpu-flags', action='store_true',
                 help='time the step under several XLA:CPU settings, each in a fresh process')
  p.add_argument('--cpu-flags', help="(--sweep-cpu-flags) ';'-separated settings, each XLA "
                 "flags and/or environment variables: --cpu-flags='--xla_a=1;NAME=2 --xla_b=3' "
                 'to try instead of the built-in list')
  p.add_argument('--group-size', type=int, default=4,
                 help='(--sweep-cpu-flags) settings whose processes run side by side '
                 '(with a default one); each holds a compiled model in memory')
  p.add_argument('--lockstep', action='store_true', help=argparse.SUPPRESS)
  return p


def _validate(args):
  for key, minimum in (('steps', 1), ('warmup', 0), ('batch_size', 1), ('image_size', 1),
                       ('width', 1), ('seconds', 0.1), ('group_size', 1)):
    if getattr(args, key) < minimum:
      raise InputError(f'--{key.replace("_", "-")}={getattr(args, key)} must be >= {minimum}')
  if args.input:
    args.inputs = _split(args.input)
    bad = [i for i in args.inputs if i not in INPUTS]
    if bad:
      raise InputError(f'unknown input {bad[0]!r}; allowed: {", ".join(INPUTS)}')
    return
  args.models = parse_models(_split(args.models))
  args.flag_sets = CPU_FLAG_SETS
  if args.cpu_flags:
    args.flag_sets = (('default', {}, []),
                      *(_flag_set(f) for f in args.cpu_flags.split(';') if f.strip()))
  default_variants = 'batch,weight' if args.sweep_cpu_flags else ','.join(VARIANTS)
  args.variants = parse_variants(_split(args.variants or default_variants),
                                 args.memory_options, args.remat, args.compute_dtype)


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


def _emit(args, text, records):
  print(text)
  if args.md:
    os.makedirs(os.path.dirname(os.path.abspath(args.md)), exist_ok=True)
    with open(args.md, 'w') as f:
      f.write(text)
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, 'w') as f:
      json.dump(records, f, indent=1)


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  if args.batch_size is None:
    args.batch_size = 128 if args.input else 16
  try:
    _validate(args)
  except InputError as e:
    print(f'error: {e}', file=sys.stderr)
    return EXIT_BAD_INPUT

  from bnfree_jax import train
  if not args.sweep_cpu_flags:  # Its workers, bench processes themselves, do this.
    runtime.use_cpu_cores(args.batch_size)  # As the trainer does, unless JAX_NUM_CPU_DEVICES is set.

  if args.input:
    rows = []
    for name in args.inputs:
      _progress(f'input pipeline {name}: {args.seconds:.0f} s')
      row = measure_input(name, args.batch_size, args.seconds)
      consumption = _consumption(name, args.batch_size, args.image_size, args.steps_json)
      row.update(consumption=consumption['what'],
                 consumption_images_per_sec=consumption['images_per_sec'], **_machine())
      rows.append(row)
    _emit(args, input_table(rows), rows)
    return 0

  if args.sweep_cpu_flags:
    rows = sweep_cpu_flags(args, args.flag_sets, args.group_size)
    if all(row['error'] for row in rows if row['label'] == 'default'):
      print(f'error: the default run failed: {rows[0]["error"]}', file=sys.stderr)
      return 1
    _emit(args, sweep_table(rows), rows)
    return 0

  runs = [_Run(model, variant, variant_config(model, variant, args.batch_size,
                                              args.image_size, args.width))
          for model in args.models for variant in args.variants]
  # A --lockstep worker of sweep_cpu_flags waits for its turn at each phase.
  gate = _lockstep_gate if args.lockstep else (lambda: None)
  try:
    records = measure_steps(runs, args.steps, args.warmup, gate)
  except InputError as e:  # E.g. a batch the devices cannot split evenly.
    print(f'error: {e}', file=sys.stderr)
    return EXIT_BAD_INPUT
  _emit(args, markdown_table(records), records)
  return 0


if __name__ == '__main__':
  sys.exit(main())
