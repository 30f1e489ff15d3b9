"""The GPU suite: Table 7 on one accelerator, its PyTorch peer and the
trainer's own loop, in one command that fits a time budget:

  python -m bnfree_jax.bench --suite gpu --json OUT.json --md OUT.md

- the trainer's compiled step for resnet18 (batch 256) and resnet50 (256 and
  128), variants batch, weight, weight_clip_dropout, none, and nf_resnet50
  (256) with AGC, in float32 and bfloat16: step time, images/s, XLA's FLOPs,
  TFLOP/s, MFU, peak memory;
- the PyTorch peer (torch_peer.py: torchvision with BN, and with weight_norm
  convs and no BN; timm's nf_resnet50 with AGC where timm is installed), eager
  and torch.compile, same sizes, AMP bfloat16 (and float32 where asked);
- an end-to-end run of `python -m bnfree_jax.main` (the *_wn recipe of the
  last model, synthetic data), whose images/s stand beside the step's.

Every piece runs in its own process, one at a time, so each framework has the
device to itself; this process never starts a JAX backend. Jobs go in order of
what they are worth (the bfloat16 pair first); one not finished when the
budget is spent is cut off, and its rows are recorded as skipped. Each row
is printed, and the JSON rewritten, as soon as it is done.

Batch sizes are global, as config.batch_size: on a one-GPU host, the batch
per device (on a host of several GPUs, CUDA_VISIBLE_DEVICES=0 keeps the JAX
steps on the one GPU the peer uses); on a CPU host, split over one CPU device
per core as the trainer does. --dry-run runs every piece at toy sizes on CPU.
"""

import collections
import dataclasses
import importlib.util
import json
import os
import pathlib
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from bnfree_jax import logs, report, runtime
from bnfree_jax.bench import common, train_step

SUITE_VARIANTS = ('batch', 'weight', 'weight_clip_dropout', 'none', 'nf_agc')
# The suite's models and their per-device batches; the first of each model is
# the one the other pieces (peer compile, float32, end to end) are measured at
# first.
SUITE_BATCHES = {'resnet18': (256,), 'resnet50': (256, 128), 'nf_resnet50': (256,)}
OTHER_BATCHES = (128,)  # Any other model --models names.
PEER_NORMS = ('batch', 'weight', 'nf_agc')  # The variants torch_peer.py has.
PEER_SCRIPT = pathlib.Path(__file__).with_name('torch_peer.py')
DRY_RUN = dict(batch_size=2, image_size=32, steps=2, warmup=1, e2e_steps=4, num_classes=10)


@dataclasses.dataclass
class Job:
  """One process of the suite and the rows it owes."""
  name: str
  part: str  # 'train_step' or 'e2e'.
  cmd: list
  rows: list  # The keys of each row it should report, for those it does not.
  env: dict = dataclasses.field(default_factory=dict)
  skip: str | None = None  # Why it cannot run at all.


def _row_key(r):
  return (r.get('part', 'train_step'), r['framework'], r.get('mode'), r['model'],
          r['variant'], r['batch_size'])


def _variant(base, dtype):
  return base + ('+bf16' if dtype == 'bfloat16' else '')


# ------------------------------------------------------------------ plan ----


def plan(args):
  """The jobs, in the order they run."""
  dtypes = sorted(args.compute_dtypes, key=lambda d: d != 'bfloat16')  # bfloat16 first.
  env = {'JAX_PLATFORMS': 'cpu'} if args.dry_run else {}
  first = {m: args.batch_sizes[m][0] for m in args.models}
  tiers = collections.defaultdict(list)

  def step_jobs(model, batch, dtype, tier, modes):
    variants = [_variant(v, dtype) for v in args.variants if train_step.fits(model, v)]
    name = f'{model}_b{batch}_{dtype}'
    trace = ['--trace', os.path.join(args.trace, name)] if args.trace else []
    tiers[tier].append(Job(
        f'bnfree_jax {name}', 'train_step',
        [sys.executable, '-m', 'bnfree_jax.bench', '--suite-worker', '--models', model,
         '--variants', ','.join(variants), '--batch-size', str(batch),
         '--image-size', str(args.image_size), '--width', str(args.width), '--stem', args.stem,
         '--steps', str(args.steps), '--warmup', str(args.warmup), *trace],
        [dict(framework='bnfree_jax', model=model, variant=v, batch_size=batch,
              compute_dtype=dtype) for v in variants], env))
    norms = [n for n in PEER_NORMS if train_step.fits(model, n)]
    no_timm = (None if args.peer_timm or norms != ['nf_agc']
               else 'the PyTorch peer has no timm for nf_resnet*')
    for mode in modes:
      peer_tier = tier + 2 if mode == 'compile' and tier == 0 else tier
      trace = ['--trace', os.path.join(args.trace, f'torch_{name}')] if args.trace else []
      tiers[peer_tier].append(Job(
          f'torch {mode} {name}', 'train_step',
          [args.peer_python, str(PEER_SCRIPT), '--models', model, '--batch-size', str(batch),
           '--image-size', str(args.image_size), '--width', str(args.width), '--stem', args.stem,
           '--norms', ','.join(norms), '--modes', mode,
           '--compute-dtype', dtype, '--steps', str(args.steps),
           '--warmup', str(args.warmup), *(['--device', 'cpu'] if args.dry_run else []),
           *trace],
          [dict(framework='torch', mode=mode, model=model, variant=_variant(norm, dtype),
                batch_size=batch, compute_dtype=dtype) for norm in norms],
          skip=args.peer_skip or no_timm))

  for model in args.models:
    for i, dtype in enumerate(dtypes):
      for j, batch in enumerate(args.batch_sizes[model]):
        # 0: the first dtype at each model's first batch (2: its torch.compile
        # rows); 3: the other dtypes; 4: the other batches.
        tier = 4 if j else 3 if i else 0
        step_jobs(model, batch, dtype, tier, args.peer_modes)
  e2e = _e2e_job(args, dtypes[0], first)
  if e2e:
    tiers[1].append(e2e)
  return [job for tier in sorted(tiers) for job in tiers[tier]]


def _e2e_job(args, dtype, first):
  """200 steps of the trainer itself with the *_wn recipe of the last model
  that has one, on synthetic data of the bench's size, at its width and stem."""
  model = next((m for m in reversed(args.models)
                if importlib.util.find_spec(f'configs.{m}_wn')), None)
  if not (args.e2e_steps and model):
    return None
  batch = first[model]
  recipe = importlib.util.find_spec(f'configs.{model}_wn').origin
  steps = args.e2e_steps
  overrides = dict(
      dataset='synthetic', **{'synthetic.image_size': args.image_size,
                              'synthetic.num_classes': (DRY_RUN['num_classes']
                                                        if args.dry_run else 1000),
                              # 16 steps an epoch: the epoch boundaries stay rare.
                              'synthetic.num_train': 16 * batch,
                              'synthetic.num_eval': batch,
                              'model.width': args.width, 'model.stem': args.stem},
      batch_size=batch, num_train_steps=steps, compute_dtype=dtype,
      log_every_steps=max(1, steps // 10), eval_every_steps=steps,
      checkpoint_every_steps=steps, histogram_every_steps=steps)
  # run_suite adds --workdir: a fresh folder, removed after.
  cmd = [sys.executable, '-m', 'bnfree_jax.main', '--config', recipe,
         *(f'--config.{k}={v}' for k, v in overrides.items())]
  row = dict(part='e2e', framework='bnfree_jax', model=model,
             variant=_variant('weight_clip_dropout', dtype), batch_size=batch,
             compute_dtype=dtype, recipe=f'configs/{model}_wn.py', steps=steps,
             image_size=args.image_size)
  return Job(f'e2e {model} {dtype}', 'e2e', cmd, [row],
             {'JAX_PLATFORMS': 'cpu'} if args.dry_run else {})


def probe_peer(python):
  """(versions, None) where torch and torchvision import under `python`,
  else (None, why not)."""
  try:
    out = subprocess.run([python, str(PEER_SCRIPT), '--probe'], capture_output=True,
                         text=True, timeout=300)
  except OSError as e:
    return None, f'{python}: {e.strerror}'
  except subprocess.TimeoutExpired:
    return None, f'{python} {PEER_SCRIPT.name} --probe took over 300 s'
  if out.returncode:
    tail = [line for line in out.stderr.splitlines() if line.strip()]
    return None, f'{python}: {tail[-1] if tail else f"exit code {out.returncode}"}'
  return json.loads(out.stdout.strip().splitlines()[-1]), None


# ------------------------------------------------------------- running ----


def _lines(stream, sink):
  for line in stream:
    sink(line)
  stream.close()


def run_job(cmd, env, deadline, on_record):
  """Runs cmd, calling on_record with each JSON record it prints as it
  prints it, and stops it at `deadline` (time.time()). Returns its exit code,
  or None if stopped, and the last lines of its stderr (which goes on to
  this process's stderr)."""
  lines, tail = queue.Queue(), collections.deque(maxlen=8)

  def err(line):
    sys.stderr.write(line)
    sys.stderr.flush()
    if line.strip():
      tail.append(line.strip())

  proc = subprocess.Popen(cmd, cwd=common.REPO, env={**os.environ, **env}, text=True,
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
  readers = [threading.Thread(target=_lines, args=(proc.stdout, lines.put), daemon=True),
             threading.Thread(target=_lines, args=(proc.stderr, err), daemon=True)]
  for t in readers:
    t.start()
  rc = None
  while rc is None:
    try:
      line = lines.get(timeout=1.0)
    except queue.Empty:
      if time.time() > deadline:
        proc.kill()  # This suite's own child; its missing rows become 'skipped'.
        proc.wait()
        break
      if not readers[0].is_alive() and lines.empty():
        rc = proc.wait()
      continue
    if line.startswith('{'):
      on_record(json.loads(line))
  readers[1].join(timeout=5)
  return rc, list(tail)


def _e2e_record(row, workdir, rc, tail, wall_s):
  """The loop's images/s from the run's event files: the median of the
  logged intervals after the first, which holds the compilation."""
  row = dict(row, wall_s=wall_s)
  if rc is None:
    return dict(row, skipped='time budget spent (cut off while running)')
  if rc:
    return dict(row, skipped=f'failed, exit code {rc}: {tail[-1] if tail else ""}')
  steps, values = report.load_run(workdir).scalars.get(logs.IMAGES_PER_SEC, ([], []))
  points = [float(v) for v in values[1:]]
  if not points:
    return dict(row, skipped=f'no {logs.IMAGES_PER_SEC} after the first log point')
  ips = statistics.median(points)
  return dict(row, images_per_sec=ips, step_time_ms=1e3 * row['batch_size'] / ips,
              images_per_sec_points=points, log_steps=[int(s) for s in steps[1:]])


def run_suite(args, meta):
  """Runs the plan within args.budget_s; returns every record, the first
  being the suite's own (meta). Prints each row as it is done."""
  start = time.time()
  deadline = start + args.budget_s
  records = [dict(meta, part='suite', finished=False)]
  print(LIVE_HEADER, flush=True)

  def done(record):
    records.append(record)
    print(live_line(record), flush=True)
    if args.json:
      common.write_json(args.json, finalize(records))

  for job in plan(args):
    # Seconds too few for a process to start and measure anything.
    skip = job.skip or (time.time() > deadline - 5 and 'time budget spent')
    if skip:
      for row in job.rows:
        done(dict(row, part=job.part, skipped=skip))
      continue
    common.progress(f'{job.name} ({deadline - time.time():.0f} s of the budget left)')
    t0 = time.time()
    if job.part == 'e2e':
      with tempfile.TemporaryDirectory(prefix='bnfree_bench_e2e_') as workdir:
        rc, tail = run_job([*job.cmd, '--workdir', workdir], job.env, deadline,
                           lambda record: None)
        done(_e2e_record(job.rows[0], workdir, rc, tail, time.time() - t0))
      continue
    seen = set()

    def take(record, part=job.part, seen=seen):
      record.setdefault('part', part)
      seen.add(_row_key(record))
      done(record)

    rc, tail = run_job([*job.cmd, '--deadline', f'{deadline:.0f}'], job.env, deadline, take)
    why = ('time budget spent (cut off while running)' if rc is None else
           f'failed, exit code {rc}: {tail[-1] if tail else ""}')
    for row in job.rows:
      if _row_key(dict(row, part=job.part)) not in seen:
        done(dict(row, part=job.part, skipped=why))
  records[0].update(finished=True, elapsed_s=time.time() - start)
  return finalize(records)


def finalize(records):
  """Every train-step record with the same keys, ratio_to_batch set from the
  recorded step times, the e2e record beside the bench step it repeats."""
  rows = [r for r in records if r.get('part') == 'train_step']
  keys = {'skipped': None, 'ratio_to_batch': None, **{k: None for r in rows for k in r}}
  out = []
  for r in records:
    r = dict({**keys, **r} if r.get('part') == 'train_step' else r)
    if r.get('part') == 'train_step' and not r['skipped']:
      base = _match(rows, r, 'batch', model=train_step.bn_twin(r['model']))
      r['ratio_to_batch'] = base and r['step_time_ms'] / base['step_time_ms']
    if r.get('part') == 'e2e' and not r.get('skipped'):
      bench = _match(rows, r, r['variant'].split('+')[0], framework='bnfree_jax')
      r['bench_images_per_sec'] = bench and bench['images_per_sec']
      r['loop_vs_step'] = bench and r['images_per_sec'] / bench['images_per_sec']
    out.append(r)
  return out


def _match(rows, r, base, framework=None, model=None):
  """The measured row of the same framework, mode, model (or this one),
  batch and dtype with this base variant, or None."""
  want = _variant(base, r['compute_dtype'])
  return next((x for x in rows if not x.get('skipped') and x['variant'] == want
               and x['framework'] == (framework or r['framework'])
               and x.get('mode') == (None if framework else r.get('mode'))
               and x['model'] == (model or r['model']) and x['batch_size'] == r['batch_size']
               and x.get('image_size') == r.get('image_size')), None)


# --------------------------------------------------------------- worker ----


def worker(args):
  """One job of the suite: the train step of one model, batch and dtype, all
  its variants, printing each record as a JSON line."""
  runtime.use_cpu_cores(args.batch_size)
  runs = [train_step.Run(model, variant, train_step.variant_config(
      model, variant, args.batch_size, args.image_size, args.width, args.stem))
          for model, variant in train_step.rows(args.models, args.variants)]
  for record in train_step.measure_rows(runs, args.steps, args.warmup, args.deadline,
                                        args.trace):
    print(json.dumps(record), flush=True)


# ---------------------------------------------------------------- tables ----


def _sig(value, scale=1.0):
  """Three significant digits, without an exponent from 1000 up: rates span
  a CPU's GFLOP/s and a GPU's TFLOP/s."""
  if value is None:
    return '—'
  value *= scale
  return f'{value:.0f}' if abs(value) >= 1000 else f'{value:.3g}'


def _who(r):
  if r.get('part') == 'e2e':
    return f"{r['framework']} end to end"
  return r['framework'] + (f" {r['mode']}" if r.get('mode') else '')


LIVE_HEADER = ('| framework | model | batch | dtype | variant | step ms median [min–max] | img/s '
               '| TFLOP/s | MFU | peak MB | compile s | other cores busy |\n'
               '|---|---|---|---|---|---|---|---|---|---|---|---|')


def live_line(r):
  """A row as it is done (its ratio to batch may not be known yet)."""
  if r.get('part') == 'e2e':
    if r.get('skipped'):
      return f"e2e {r['model']} {r['variant']}: skipped: {r['skipped']}"
    return (f"e2e {r['model']} {r['variant']} batch {r['batch_size']}: the trainer's loop "
            f"{r['images_per_sec']:.1f} img/s over {r['steps']} steps")
  if r.get('skipped'):
    return (f"| {_who(r)} | {r['model']} | {r['batch_size']} | {r['compute_dtype']} | "
            f"{r['variant']} | skipped: {r['skipped']} |")
  return (f"| {_who(r)} | {r['model']} | {r['batch_size']} | {r['compute_dtype']} | "
          f"{r['variant']}{'' if r['all_finite'] else ' (non-finite loss)'} | "
          f"{r['step_time_ms']:.1f} [{r['step_time_ms_min']:.1f}–{r['step_time_ms_max']:.1f}] | "
          f"{r['images_per_sec']:.1f} | {_sig(r.get('flops_per_sec'), 1e-12)} | "
          f"{common.cell(r.get('mfu'), '.1%')} | {common.mb(r.get('peak_bytes'))} | "
          f"{common.cell(r.get('compile_s'), '.1f')} | {common.cores(r.get('other_cpu_cores'))} |")


def _table_order(r):
  """Model, batch (largest first), dtype, then bnfree_jax, torch eager, torch
  compile, each in the order of the suite's variants."""
  modes = {None: 0, 'eager': 1, 'compile': 2}
  variants = {v: i for i, v in enumerate(SUITE_VARIANTS)}
  return (r['model'], -r['batch_size'], r['compute_dtype'], modes.get(r.get('mode'), 3),
          variants.get(r['variant'].split('+')[0], len(variants)), r['variant'])


def markdown(records):
  """The suite's report, from its records alone (the JSON holds them)."""
  meta, rest = records[0], records[1:]
  steps = [r for r in rest if r.get('part') == 'train_step']
  done = [r for r in steps if not r.get('skipped')]
  jax_rows = [r for r in done if r['framework'] == 'bnfree_jax']
  torch_rows = [r for r in done if r['framework'] == 'torch']
  devices = sorted({r['device'] for r in done})
  lines = [
      f"Suite {meta['suite']}{' (dry run)' if meta['dry_run'] else ''}: "
      f"{', '.join(devices) or 'no row measured'}; jax {meta['jax_version']}"
      + (f", torch {torch_rows[0]['torch_version']} / torchvision "
         f"{torch_rows[0]['torchvision_version']}" if torch_rows else '')
      + f"; {meta['image_size']} px, median of {meta['steps']} timed steps after "
      f"{meta['warmup']} warm-up, each row alone on the device; budget {meta['budget_s']:.0f} s, "
      + (f"took {meta['elapsed_s']:.0f} s." if meta['finished'] else 'cut off.'), '',
      f"`{meta['command']}`", '',
      '## Train step', '',
      '| framework | model | batch | dtype | variant | step ms median [min–max] | img/s '
      '| × batch | GFLOP/step | TFLOP/s | MFU | peak MB | XLA MB | compile s | other cores busy |',
      '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|']
  for r in sorted(done, key=_table_order):
    lines.append(
        f"| {_who(r)} | {r['model']} | {r['batch_size']} | {r['compute_dtype']} | "
        f"{r['variant']}{'' if r['all_finite'] else ' (non-finite loss)'} | "
        f"{r['step_time_ms']:.1f} [{r['step_time_ms_min']:.1f}–{r['step_time_ms_max']:.1f}] | "
        f"{r['images_per_sec']:.1f} | {common.cell(r['ratio_to_batch'], '.2f')} | "
        f"{_sig(r['flops_per_step'], 1e-9)} | {_sig(r['flops_per_sec'], 1e-12)} | "
        f"{common.cell(r['mfu'], '.1%')} | {common.mb(r['peak_bytes'])} | "
        f"{common.mb(r['xla_bytes'])} | {common.cell(r['compile_s'], '.1f')} | "
        f"{common.cores(r.get('other_cpu_cores'))} |")
  lines += ['', '× batch: the step time over that of the same framework\'s batch-norm row '
            '(for nf_resnetN: resnetN with BN) at the same batch and dtype.',
            '', 'Peak MB: the allocator\'s peak while the row ran (bnfree_jax: memory_stats(), '
            "a job's rows in order of XLA's footprint estimate, n/a where an earlier row's "
            'peak was higher or the backend keeps none; torch: max_memory_allocated()). '
            "XLA MB: XLA's own estimate of the step's arguments, outputs and temporaries."]
  peaks = sorted({f"{r['peak_name']} {r['peak_tflops']:g}" for r in jax_rows if r['peak_name']})
  if peaks:
    lines += ['', "MFU: XLA's FLOPs per step over the step time, as a share of the "
              f"device's peak TFLOP/s ({', '.join(peaks)})."]
  if torch_rows:
    lines += ['', '## bnfree_jax against PyTorch', '',
              'Images/s of the same model, batch, dtype and normalization; × > 1: '
              'bnfree_jax is faster.', '',
              '| model | batch | dtype | variant | bnfree_jax img/s | torch eager img/s '
              '| × eager | torch compile img/s | × compile |', '|---|---|---|---|---|---|---|---|---|']
    for r in sorted(jax_rows, key=_table_order):
      peers = {m: next((t for t in torch_rows if t['mode'] == m and t['model'] == r['model']
                        and t['batch_size'] == r['batch_size'] and t['variant'] == r['variant']),
                       None) for m in ('eager', 'compile')}
      if not any(peers.values()):
        continue
      cells = []
      for m in ('eager', 'compile'):
        t = peers[m]
        cells += ([f"{t['images_per_sec']:.1f}", f"{r['images_per_sec'] / t['images_per_sec']:.2f}"]
                  if t else ['—', '—'])
      lines.append(f"| {r['model']} | {r['batch_size']} | {r['compute_dtype']} | {r['variant']} | "
                   f"{r['images_per_sec']:.1f} | {' | '.join(cells)} |")
  e2e = [r for r in rest if r.get('part') == 'e2e']
  if e2e:
    lines += ['', '## The trainer end to end', '',
              "`python -m bnfree_jax.main`, synthetic data; the loop's images/s are the median "
              'of its logged intervals after the first (which compiles).', '',
              '| recipe | dtype | batch | steps | loop img/s | bench step img/s | loop ÷ step '
              '| wall s |', '|---|---|---|---|---|---|---|---|']
    for r in e2e:
      if r.get('skipped'):
        lines.append(f"| {r['recipe']} | {r['compute_dtype']} | {r['batch_size']} | "
                     f"{r['steps']} | skipped: {r['skipped']} | | | |")
        continue
      lines.append(f"| {r['recipe']} | {r['compute_dtype']} | {r['batch_size']} | {r['steps']} | "
                   f"{r['images_per_sec']:.1f} | {common.cell(r['bench_images_per_sec'], '.1f')} | "
                   f"{common.cell(r['loop_vs_step'], '.2f')} | {r['wall_s']:.0f} |")
  skipped = collections.defaultdict(list)
  for r in rest:
    if r.get('skipped'):
      skipped[r['skipped']].append(f"{_who(r)} {r['model']} {r['variant']} batch {r['batch_size']}")
  if skipped:
    lines += ['', '## Not measured', '']
    lines += [f"- {why}: {'; '.join(rows)}" for why, rows in skipped.items()]
  return '\n'.join(lines) + '\n'
