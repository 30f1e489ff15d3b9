"""The paper's Table 7 under XLA: the trainer's own compiled step, one row per
model and variant, with XLA's FLOPs and memory, and MFU where the device's
peak is known."""

import contextlib
import dataclasses
import os
import statistics
import time

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from bnfree_jax import datasets, models, train
from bnfree_jax.bench import common
from bnfree_jax.logs import format_duration
from bnfree_jax.workdir import InputError

# Table 7's rows (vanilla; non-BN; + adaptive clipping; + dropout), the
# unnormalized network, and the normalizer-free one (its own family of
# models). Learning rates are the paper's for each row (Tables 1, 5, Fig. 3a);
# they do not change the work per step, but keep the steps finite (ResNet-50
# WN without clipping diverges at 0.017, and NaNs are no benchmark).
VARIANTS = {
    'batch': dict(norm='batch', base_lr=0.1),
    'weight': dict(norm='weight', base_lr=0.001),
    'weight_clip': dict(norm='weight', base_lr=0.017, clip=True),
    'weight_clip_dropout': dict(norm='weight', base_lr=0.017, clip=True, dropout_rate=0.1),
    'none': dict(norm='none', base_lr=1e-5),
    # NF-ResNets (models.nf_resnet) only, as configs/nf_resnet50.py trains them.
    'nf_agc': dict(norm='scaled_ws', base_lr=0.1, agc=0.01),
    # GroupNorm where BN was (Opacus's replacement), and the same network under
    # DP-SGD (issue 20): each example's gradient clipped to norm 1, noise
    # multiplier 1, the whole batch one micro-batch. Its row is also held
    # against the 'group' row: the price of privacy per step.
    'group': dict(norm='group', base_lr=0.1),
    'dp': dict(norm='group', base_lr=0.1, dp=True),
}
NONPRIVATE = {'dp': 'group'}
# Memory options: suffix -> (config key, value).
OPTIONS = {'remat': ('remat', True), 'bf16': ('compute_dtype', 'bfloat16')}
COMPUTE_DTYPES = ('float32', 'bfloat16')

# Dense (no sparsity) peak TFLOP/s of one device, from NVIDIA's datasheets,
# matched in this order on a substring of jax's device_kind. float32 compute
# is held against the TF32 tensor-core rate: XLA and cuDNN run float32
# convolutions in TF32 at JAX's default precision. V100 has neither TF32 nor
# bfloat16 tensor cores, so both are held against its FP32 rate.
PEAK_TFLOPS = (
    ('H100 NVL', 'H100 NVL', {'float32': ('tf32', 417.5), 'bfloat16': ('bf16', 835.5)}),
    ('H100 PCIe', 'H100 PCIe', {'float32': ('tf32', 378.0), 'bfloat16': ('bf16', 756.0)}),
    ('H100', 'H100 SXM', {'float32': ('tf32', 494.7), 'bfloat16': ('bf16', 989.4)}),
    ('H200 NVL', 'H200 NVL', {'float32': ('tf32', 417.5), 'bfloat16': ('bf16', 835.5)}),
    ('H200', 'H200 SXM', {'float32': ('tf32', 494.7), 'bfloat16': ('bf16', 989.4)}),
    ('A100', 'A100', {'float32': ('tf32', 156.0), 'bfloat16': ('bf16', 312.0)}),
    ('V100S', 'V100S PCIe', {'float32': ('fp32', 16.4), 'bfloat16': ('fp32', 16.4)}),
    ('V100-PCIE', 'V100 PCIe', {'float32': ('fp32', 14.0), 'bfloat16': ('fp32', 14.0)}),
    ('V100', 'V100 SXM2', {'float32': ('fp32', 15.7), 'bfloat16': ('fp32', 15.7)}),
)


def peak(device_kind, compute_dtype):
  """(name, TFLOP/s) of one device for this compute dtype, or (None, None)."""
  for key, name, rates in PEAK_TFLOPS:
    if key.lower() in device_kind.lower():
      precision, tflops = rates[compute_dtype]
      return f'{name} {precision} dense', tflops
  return None, None


def mfu(flops_per_step, step_seconds, peak_tflops, num_devices):
  """Model FLOPs utilization: XLA's FLOPs of a step (all devices) over the
  time they took, as a fraction of the devices' peak."""
  if not (flops_per_step and peak_tflops):
    return None
  return flops_per_step / step_seconds / (peak_tflops * 1e12 * num_devices)


# ------------------------------------------------------------ variants ----


def parse_variants(names, memory_options=False, remat=False, compute_dtype='float32'):
  """Variant names, validated and expanded ('weight' -> 'weight+remat', ...)."""
  if compute_dtype not in COMPUTE_DTYPES:
    raise InputError(f'--compute-dtype {compute_dtype!r} is not one of: {", ".join(COMPUTE_DTYPES)}')
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
  if not names:
    raise InputError(f'--models is empty; allowed: {", ".join(models.RESNETS)}')
  for name in names:
    if name not in models.RESNETS:
      raise InputError(f'unknown model {name!r}; allowed: {", ".join(models.RESNETS)}')
  return names


def fits(model, variant):
  """Whether the variant applies to the model: 'nf_agc' to the nf_* models,
  which take no other norm, the others to the rest."""
  nf = VARIANTS[variant.split('+')[0]]['norm'] == models.nf_resnet.NORM
  return nf == model.startswith('nf_')


def bn_twin(model):
  """The model whose 'batch' row a row of this model is compared with: the
  BN ResNet of the same depth for an NF-ResNet, else the model itself."""
  return model.removeprefix('nf_')


def rows(model_names, variants):
  """The (model, variant) pairs to measure: every model with each variant
  that fits it; a model that none fits is an InputError."""
  pairs = [(m, v) for m in model_names for v in variants if fits(m, v)]
  for m in model_names:
    if not any(pm == m for pm, _ in pairs):
      raise InputError(f'no variant of {", ".join(variants)} fits model {m!r}: the nf_* '
                       'models take nf_agc only, the others every variant but nf_agc')
  return pairs


# The train step's default classes and image channels: ImageNet's.
NUM_CLASSES, _, _MEAN, _ = datasets.SPECS['imagenet2012']
CHANNELS = len(_MEAN)


def variant_config(model, variant, batch_size, image_size, width, stem='imagenet',
                   num_classes=NUM_CLASSES, channels=CHANNELS):
  """The trainer's config for one table row, on in-memory synthetic data."""
  base, *options = variant.split('+')
  spec = VARIANTS[base]
  c = common.load_config('default')
  c.dataset = 'synthetic'
  # setup() only reads these numbers; the bench feeds its own batch, so the
  # synthetic images themselves are never generated.
  c.synthetic.update(image_size=image_size, channels=channels, num_classes=num_classes,
                     num_train=max(1024, batch_size), num_eval=batch_size)
  c.batch_size = batch_size
  c.num_train_steps = 10_000  # Only shapes the schedules.
  c.histogram_layer = ''  # No gradient summaries are timed (and ResNet-10 lacks the default's).
  c.model.update(name=model, norm=spec['norm'], width=width, stem=stem,
                 dropout_rate=spec.get('dropout_rate', 0.0))
  c.lr_schedule.base_lr = spec['base_lr']
  if spec.get('clip'):  # The paper's adaptive clipping, as in resnet18_wn.py.
    c.grad_clip.update(mode='log', threshold=5.0, final_threshold=50.0)
  if spec.get('agc'):
    c.grad_clip.update(mode='agc', agc_clipping=spec['agc'])
  if spec.get('dp'):
    c.dp.update(enabled=True, noise_multiplier=1.0, l2_clip=1.0, microbatch_size=batch_size)
  for option in options:
    key, value = OPTIONS[option]
    c[key] = value
  return c


# ----------------------------------------------------------- the steps ----


@dataclasses.dataclass
class Run:
  """One row being measured: its compiled step, live state and timings."""
  model: str
  variant: str
  config: object
  setup: object = None
  compiled: object = None
  state: object = None
  batch: object = None
  record: dict = dataclasses.field(default_factory=dict)
  times: list = dataclasses.field(default_factory=list)
  cpu_times: list = dataclasses.field(default_factory=list)
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
              output_bytes=m.output_size_in_bytes, alias_bytes=m.alias_size_in_bytes,
              xla_bytes=(m.argument_size_in_bytes + m.output_size_in_bytes
                         - m.alias_size_in_bytes + m.temp_size_in_bytes))


def compile_run(run):
  """setup + AOT compile of exactly the step the trainer runs, from the
  state's shapes alone: no device memory is taken until load_run. The DP
  step is three programs driven from Python (train.jit_train_step): they
  compile in its first step, and XLA's FLOPs and memory are not reported."""
  s = run.setup = train.setup(run.config)
  if run.config.dp.enabled:
    run.compiled = train.jit_train_step(s)
    run.record.update(compile_s=None, num_devices=s.mesh.devices.size, flops_per_step=None)
    return
  replicated, data = NamedSharding(s.mesh, P()), NamedSharding(s.mesh, P('data'))
  state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                       jax.eval_shape(lambda: train.init_state(s)))
  n = run.config.batch_size
  batch = {'image': jax.ShapeDtypeStruct((n, *s.info.image_shape), np.float32, sharding=data),
           'label': jax.ShapeDtypeStruct((n,), np.int32, sharding=data)}
  t0 = time.perf_counter()
  run.compiled = train.jit_train_step(s).lower(state, batch).compile()
  # Both analyses describe the partitioned program of one device: FLOPs add
  # up over the mesh, memory is what each device needs.
  num_devices = s.mesh.devices.size
  flops = _cost_flops(run.compiled)
  run.record.update(compile_s=time.perf_counter() - t0, num_devices=num_devices,
                    flops_per_step=flops * num_devices if flops else None,
                    **_memory(run.compiled))


def load_run(run):
  """The run's initial state and one random batch, on its devices."""
  s = run.setup
  run.state = train.init_state(s)
  rng, n = np.random.default_rng(0), run.config.batch_size
  batch = {'image': rng.normal(size=(n, *s.info.image_shape)).astype(np.float32),
           'label': rng.integers(s.info.num_classes, size=n).astype(np.int32)}
  if run.config.dp.enabled:  # One micro-batch of n real examples.
    batch = [dict(batch, index=np.arange(n, dtype=np.int32), mask=np.ones(n, bool))]
  run.batch = jax.device_put(batch, NamedSharding(s.mesh, P('data')))


def free_run(run):
  run.compiled = run.state = run.batch = run.setup = None


def footprint(run):
  return run.record.get('argument_bytes', 0) + run.record.get('temp_bytes', 0)


def _device_peak():
  stats = jax.local_devices()[0].memory_stats()  # None on CPU.
  return stats if stats and 'peak_bytes_in_use' in stats else None


def _step(run):
  """Wall seconds of one step; its CPU seconds go to run.cpu_times."""
  t0, c0 = time.perf_counter(), time.process_time()
  # The state is donated: its buffers become the new state's, so feed it back.
  run.state, finite = run.compiled(run.state, run.batch)
  jax.block_until_ready(run.state)
  run.finite &= bool(finite)
  run.cpu_times.append(time.process_time() - c0)
  return time.perf_counter() - t0


def _tracing(trace_dir):
  """A jax.profiler trace into trace_dir, with a Perfetto JSON beside the
  XPlane file so it can be read without TensorBoard; nothing without a dir."""
  if not trace_dir:
    return contextlib.nullcontext()
  return jax.profiler.trace(trace_dir, create_perfetto_trace=True)


def _finish(run, warmup, load_start, load_end, other_cores, machine):
  """Fills run.record from its timings."""
  timed = run.times[warmup:]
  median = statistics.median(timed)
  c = run.config
  flops = run.record.get('flops_per_step')
  device_kind = jax.devices()[0].device_kind
  peak_name, peak_tflops = peak(device_kind, c.compute_dtype)
  run.record.update(
      model=run.model, variant=run.variant, norm=c.model.norm, remat=bool(c.remat),
      compute_dtype=c.compute_dtype, dropout_rate=c.model.dropout_rate,
      grad_clip=c.grad_clip.mode, width=c.model.width, batch_size=c.batch_size,
      image_size=c.synthetic.image_size if c.dataset == 'synthetic' else None,
      num_classes=run.setup.info.num_classes, channels=run.setup.info.image_shape[-1],
      dataset=c.dataset, steps=len(timed), warmup=warmup,
      step_time_ms=1e3 * median, step_time_ms_min=1e3 * min(timed),
      step_time_ms_max=1e3 * max(timed), step_times_ms=[1e3 * t for t in timed],
      **common.cpu_record(run.cpu_times[warmup:]),
      images_per_sec=c.batch_size / median,
      flops_per_sec=flops / median if flops else None, peak_name=peak_name,
      peak_tflops=peak_tflops, mfu=mfu(flops, median, peak_tflops, run.record['num_devices']),
      all_finite=run.finite, load_avg_start=load_start, load_avg_end=load_end,
      other_cpu_cores=other_cores, framework='bnfree_jax', **machine)


def measure_steps(runs, steps, warmup, gate=lambda: None, trace_dir=None):
  """Compiles every run, then times them round-robin: round r steps every run
  once, so drifting machine load hits all variants alike. Fills run.record.
  gate() is called before the compilations and before each round."""
  gate()
  load_start = os.getloadavg()[0]
  for i, run in enumerate(runs):
    common.progress(f'compiling {i + 1}/{len(runs)}: {run.model} {run.variant}')
    compile_run(run)
    load_run(run)

  # Device peak (GPU): the allocator's peak never resets, so each run's first
  # step goes in order of the compiler's footprint estimate, and the other
  # runs' resident buffers are subtracted. CPU keeps no statistics: n/a.
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
  cpu_start = common.cpu_seconds()
  t0 = time.perf_counter()

  def play(first, last):
    for r in range(first, last):
      gate()
      # Alternate the order, so no variant always follows the same neighbour.
      for run in (runs if r % 2 else runs[::-1]):
        run.times.append(_step(run))
      per_round = (time.perf_counter() - t0) / r
      common.progress(f'step {r + 1}/{rounds} ({"warm-up" if r < warmup else "timed"}) of '
                      f'{len(runs)} variants, ETA {format_duration(per_round * (rounds - 1 - r))}')

  play(1, warmup)  # Round 0 was the first step above.
  with _tracing(trace_dir):  # The timed rounds only: no compilation in the trace.
    play(max(1, warmup), rounds)

  load_end = os.getloadavg()[0]
  other_cores = common.other_cores(cpu_start, common.cpu_seconds())
  machine = common.machine()
  for run in runs:
    _finish(run, warmup, load_start, load_end, other_cores, machine)
    free_run(run)  # Device memory goes before the next table is measured.
  def ratios(run, key, model, variant):
    # The median of per-round ratios: both steps of a round ran seconds apart,
    # so a load change between rounds (another job) cancels out.
    base = next((r for r in runs if r.model == model and r.variant == variant), None)
    run.record[key] = run.record[f'{key}_quartiles'] = None
    if base:
      per_round = [t / b for t, b in zip(run.record['step_times_ms'],
                                         base.record['step_times_ms'])]
      run.record[key] = statistics.median(per_round)
      # Their spread says how far the median ratio can be trusted.
      run.record[f'{key}_quartiles'] = (statistics.quantiles(per_round, n=4)[::2]
                                        if len(per_round) > 1 else [per_round[0]] * 2)

  for run in runs:
    ratios(run, 'ratio_to_batch', bn_twin(run.model), 'batch')
    base, *options = run.variant.split('+')
    if base in NONPRIVATE:
      ratios(run, 'ratio_to_nonprivate', run.model, '+'.join([NONPRIVATE[base], *options]))
  return [run.record for run in runs]


def row_basics(model, variant, config):
  """The keys that name a row, for a row that was skipped."""
  return dict(model=model, variant=variant, norm=config.model.norm,
              compute_dtype=config.compute_dtype, batch_size=config.batch_size,
              image_size=config.synthetic.image_size, framework='bnfree_jax')


def measure_rows(runs, steps, warmup, deadline=float('inf'), trace_dir=None):
  """Compiles every run, then measures each alone, one after the other, and
  yields its record when done; a run not started by `deadline` (time.time())
  is yielded as {'skipped': reason}. Without an interleaving of variants this
  suits a quiet device (a GPU), not a shared CPU.

  Device peak (GPU): only one run's buffers are live at a time, but the
  allocator's peak never resets, so the runs go in order of the compiler's
  footprint estimate; a run whose peak stays under an earlier one's gets None.
  """
  todo = []
  for i, run in enumerate(runs):
    if time.time() > deadline:
      yield dict(row_basics(run.model, run.variant, run.config), skipped='time budget spent')
      continue
    common.progress(f'compiling {i + 1}/{len(runs)}: {run.model} {run.variant} '
                    f'batch {run.config.batch_size}')
    compile_run(run)
    todo.append(run)
  for run in sorted(todo, key=footprint):
    if time.time() > deadline:
      yield dict(row_basics(run.model, run.variant, run.config), skipped='time budget spent')
      free_run(run)
      continue
    load_start, cpu_start = os.getloadavg()[0], common.cpu_seconds()
    before = _device_peak()
    load_run(run)
    for _ in range(warmup):
      run.times.append(_step(run))
    row_dir = trace_dir and os.path.join(
        trace_dir, f'{run.model}_{run.variant}_b{run.config.batch_size}')
    with _tracing(row_dir):
      for _ in range(steps):
        run.times.append(_step(run))
    after = _device_peak()
    run.record['peak_bytes'] = (
        after['peak_bytes_in_use'] if after and (
            not before or after['peak_bytes_in_use'] > before['peak_bytes_in_use']) else None)
    run.record['trace_dir'] = row_dir
    _finish(run, warmup, load_start, os.getloadavg()[0],
            common.other_cores(cpu_start, common.cpu_seconds()), common.machine())
    free_run(run)
    yield run.record


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
      f"{common.cores(first['other_cpu_cores'])} cores busy while the steps ran. "
      "× batch: against the model's batch-norm row (for nf_resnetN: resnetN's); "
      "a DP-SGD row also against its non-private twin ('dp' against 'group'). "
      "DP rows compile in their first step: no compile time, FLOPs or XLA memory.", '',
      '| model | variant | step ms median [min–max] | CPU ms | img/s | × batch: median (quartiles) of '
      'per-round ratios | compile s | GFLOPs/step | GFLOP/s | temp MB/device '
      '| argument MB/device | peak MB |',
      '|---|---|---|---|---|---|---|---|---|---|---|---|']
  for r in records:
    ratio = '—'
    if r['ratio_to_batch'] is not None:
      q1, q3 = r['ratio_to_batch_quartiles']
      ratio = f"{r['ratio_to_batch']:.2f} ({q1:.2f}–{q3:.2f})"
    if r.get('ratio_to_nonprivate') is not None:
      q1, q3 = r['ratio_to_nonprivate_quartiles']
      ratio += f"; × {NONPRIVATE[r['variant'].split('+')[0]]}: " \
               f"{r['ratio_to_nonprivate']:.2f} ({q1:.2f}–{q3:.2f})"
    gflops = '—' if r['flops_per_step'] is None else f"{r['flops_per_step'] / 1e9:.3g}"
    rate = '—' if r['flops_per_sec'] is None else f"{r['flops_per_sec'] / 1e9:.3g}"
    finite = '' if r['all_finite'] else ' (non-finite loss)'
    lines.append(
        f"| {r['model']} | {r['variant']}{finite} | {r['step_time_ms']:.0f} "
        f"[{r['step_time_ms_min']:.0f}–{r['step_time_ms_max']:.0f}] | {r['step_cpu_ms']:.0f} | "
        f"{r['images_per_sec']:.1f} | {ratio} | {common.cell(r['compile_s'], '.1f')} | "
        f"{gflops} | {rate} | "
        f"{common.mb(r.get('temp_bytes'))} | {common.mb(r.get('argument_bytes'))} | "
        f"{common.mb(r.get('peak_bytes'))} |")
  return '\n'.join(lines) + '\n'
