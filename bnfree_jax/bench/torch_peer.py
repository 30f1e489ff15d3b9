"""PyTorch peer of the bnfree_jax train step: torchvision's ResNets with BN
('batch'), and with torch.nn.utils.parametrizations.weight_norm on every conv
(given a bias) and no BN ('weight', the paper's own setting); timm's
NF-ResNets with adaptive gradient clipping ('nf_agc'); torchvision's ResNets
with GroupNorm where BN was ('group'), and the same trained with DP-SGD by
Opacus ('dp': per-example gradients by its GradSampleModule hooks, each
clipped to norm 1, noise multiplier 1, by its DPOptimizer); one SGD momentum step
on random data, channels_last, bfloat16 AMP autocast or float32, eager or
under torch.compile.

A standalone script needing only torch and torchvision, and timm for the
NF-ResNets and opacus for 'dp' (no bnfree_jax, JAX or TensorFlow), so that
`python -m bnfree_jax.bench --suite gpu` can run it with another interpreter,
each framework alone on the device:

  python torch_peer.py --models resnet18 --batch-size 256 --image-size 224 \
      --norms batch,weight --modes eager,compile --compute-dtype bfloat16

Prints one JSON record per finished row on stdout (progress on stderr);
--probe prints the versions and exits, failing where torch cannot be imported.
"""

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import types

import torch
import torchvision
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

NORMS = ('batch', 'weight', 'nf_agc', 'group', 'dp')
MODES = ('eager', 'compile')
COMPUTE_DTYPES = ('float32', 'bfloat16')
MODELS = ('resnet10', 'resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152',
          'nf_resnet26', 'nf_resnet50', 'nf_resnet101')
# The bench's learning rates for its rows: they keep the steps finite, and do
# not change the work.
BASE_LR = {'batch': 0.1, 'weight': 0.001, 'nf_agc': 0.1, 'group': 0.1, 'dp': 0.1}
GN_GROUPS = 16  # At most, as bnfree_jax's model.gn_groups: gcd(16, width) groups.
# bnfree_jax.models.resnet.STEMS' 3x3 stems without max pool -> stride (this file runs without jax).
SMALL_STEMS = {'small': 1, 'small_s2': 2}
DP_CLIP, DP_NOISE = 1.0, 1.0  # As bnfree_jax.bench.train_step's 'dp' variant.
AGC_CLIPPING = 0.01  # configs/nf_resnet50.py's, the classifier unclipped.


def _progress(message):
  print(f'[torch peer] {message}', file=sys.stderr, flush=True)


def _weight_norm_convs(module):
  """Every Conv2d below module becomes weight_norm(Conv2d with bias), the
  same initial filters, the bias 0 (weight_norm starts g at ||v||, so the
  filters are unchanged)."""
  for name, child in module.named_children():
    if isinstance(child, nn.Conv2d):
      conv = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size,
                       stride=child.stride, padding=child.padding, dilation=child.dilation,
                       groups=child.groups, bias=True)
      with torch.no_grad():
        conv.weight.copy_(child.weight)
        conv.bias.zero_()
      setattr(module, name, weight_norm(conv))
    else:
      _weight_norm_convs(child)


def _residual_forward(block, x):
  """torchvision's BasicBlock / Bottleneck forward, its add and ReLUs out of place."""
  identity = x if block.downsample is None else block.downsample(x)
  out = block.relu(block.bn1(block.conv1(x)))
  out = block.bn2(block.conv2(out))
  if hasattr(block, 'conv3'):
    out = block.bn3(block.conv3(block.relu(out)))
  return block.relu(out + identity)


def _out_of_place(net):
  """No in-place ReLU or residual add: Opacus's backward hooks refuse to have
  a hooked module's output modified in place."""
  for module in net.modules():
    if isinstance(module, nn.ReLU):
      module.inplace = False
    if isinstance(module, (torchvision.models.resnet.BasicBlock,
                           torchvision.models.resnet.Bottleneck)):
      module.forward = types.MethodType(_residual_forward, module)


def fits(model, norm):
  """'nf_agc' goes with timm's nf_* models only, the other norms with torchvision's."""
  return (norm == 'nf_agc') == model.startswith('nf_')


def _narrow(net, width):
  """net with `width` channels in its first stage (torchvision's: 64), the
  later stages doubling as theirs do; the rebuilt layers have PyTorch's
  default init, which changes no step time."""
  block, norm_layer = type(net.layer1[0]), net._norm_layer
  net.inplanes = width
  net.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
  net.bn1 = norm_layer(width)
  for i in range(4):
    layer = getattr(net, f'layer{i + 1}')
    setattr(net, f'layer{i + 1}', net._make_layer(block, width * 2**i, len(layer),
                                                 stride=1 if i == 0 else 2))
  net.fc = nn.Linear(width * 8 * block.expansion, net.fc.out_features)
  return net


def build(model, norm, width=64, stem='imagenet', num_classes=1000, channels=3):
  """torchvision's model with BN, or without BN and with weight-normalized
  convs, optionally narrower and with one of bnfree_jax's small stems (a 3x3
  conv at stride 1 or 2, small_s2, no max pool); timm's NF-ResNet."""
  if norm == 'nf_agc':
    import timm  # Only here: the other rows need no timm.
    return timm.create_model(model, num_classes=num_classes, in_chans=channels)
  # nn.Identity takes (and ignores) the channel count torchvision passes.
  norm_layer = {'batch': nn.BatchNorm2d, 'weight': nn.Identity}.get(
      norm, lambda channels: nn.GroupNorm(math.gcd(GN_GROUPS, width), channels))
  # torchvision builds ResNet-10 (one BasicBlock a stage) but names no function for it.
  net = (torchvision.models.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1],
                                   num_classes=num_classes, norm_layer=norm_layer)
         if model == 'resnet10' else
         getattr(torchvision.models, model)(num_classes=num_classes, norm_layer=norm_layer))
  if width != 64:
    net = _narrow(net, width)
  if stem in SMALL_STEMS:
    net.conv1 = nn.Conv2d(3, width, 3, stride=SMALL_STEMS[stem], padding=1, bias=False)
    net.maxpool = nn.Identity()
  if channels != 3:
    c = net.conv1
    net.conv1 = nn.Conv2d(channels, c.out_channels, c.kernel_size, c.stride, c.padding, bias=False)
  if norm == 'weight':
    _weight_norm_convs(net)
  return net


def _device_name(device):
  if device.type == 'cuda':
    return f'cuda:{torch.cuda.get_device_name(device)} x1'
  model = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      model = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    pass
  return f'cpu:{model} ({torch.get_num_threads()} threads)'


def _cpu_seconds():
  """(wall, CPU seconds all cores were busy, CPU seconds of this process and
  its children, torch.compile's workers), as
  bnfree_jax.bench.common.cpu_seconds (this script imports nothing of
  bnfree_jax), or None without /proc/stat."""
  try:
    with open('/proc/stat') as f:
      jiffies = [int(x) for x in f.readline().split()[1:]]
  except OSError:
    return None
  busy = (sum(jiffies) - jiffies[3] - jiffies[4]) / os.sysconf('SC_CLK_TCK')
  t = os.times()
  return t.elapsed, busy, t.user + t.system + t.children_user + t.children_system


def _other_cores(start, end):
  """Cores other processes kept busy on average between two _cpu_seconds()."""
  if not (start and end) or end[0] <= start[0]:
    return None
  return max(0.0, ((end[1] - start[1]) - (end[2] - start[2])) / (end[0] - start[0]))


def _version(package):
  import importlib.metadata
  return importlib.metadata.version(package)


def _sync(device):
  if device.type == 'cuda':
    torch.cuda.synchronize(device)


def measure(model_name, norm, mode, compute_dtype, batch_size, image_size, steps, warmup,
            device, trace_dir=None, width=64, stem='imagenet', num_classes=1000, channels=3):
  """One row: median step time of `steps` timed steps after `warmup` ones."""
  torch.manual_seed(0)
  model = build(model_name, norm, width, stem, num_classes, channels).to(
      device, memory_format=torch.channels_last)
  model.train()
  optimizer = torch.optim.SGD(model.parameters(), lr=BASE_LR[norm], momentum=0.9,
                              weight_decay=1e-4)
  if norm == 'dp':
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer
    _out_of_place(model)
    model = GradSampleModule(model)  # Mean loss: its hooks scale by the batch back.
    optimizer = DPOptimizer(optimizer, noise_multiplier=DP_NOISE, max_grad_norm=DP_CLIP,
                            expected_batch_size=batch_size)
  net = torch.compile(model) if mode == 'compile' else model
  if norm == 'nf_agc':  # timm's AGC, the classifier ('head.') unclipped.
    from timm.utils import adaptive_clip_grad
    clipped = [p for name, p in model.named_parameters() if not name.startswith('head.')]
  loss_fn = nn.CrossEntropyLoss()
  x = torch.randn(batch_size, channels, image_size, image_size, device=device).contiguous(
      memory_format=torch.channels_last)
  y = torch.randint(0, num_classes, (batch_size,), device=device)
  amp = compute_dtype == 'bfloat16'

  def step():
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
      loss = loss_fn(net(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if norm == 'nf_agc':
      adaptive_clip_grad(clipped, clip_factor=AGC_CLIPPING)
    optimizer.step()
    return loss

  if device.type == 'cuda':
    torch.cuda.reset_peak_memory_stats(device)
  load_start, cpu_start = os.getloadavg()[0], _cpu_seconds()
  activities = [torch.profiler.ProfilerActivity.CPU]
  if device.type == 'cuda':
    activities.append(torch.profiler.ProfilerActivity.CUDA)
  profiler = torch.profiler.profile(activities=activities)
  times, cpu_times = [], []
  for i in range(warmup + steps):
    if trace_dir and i == warmup:  # The timed steps only.
      profiler.start()
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    loss = step()
    _sync(device)
    times.append(time.perf_counter() - t0)
    cpu_times.append(time.process_time() - c0)
    if i == 0:
      _progress(f'{model_name} {norm} {mode} {compute_dtype}: first step {times[0]:.1f} s')
  if trace_dir:
    profiler.stop()
    name = f'torch_{model_name}_{norm}_{mode}_{compute_dtype}_b{batch_size}'
    os.makedirs(trace_dir, exist_ok=True)
    profiler.export_chrome_trace(os.path.join(trace_dir, f'{name}.json'))
    sort = 'self_cuda_time_total' if device.type == 'cuda' else 'self_cpu_time_total'
    with open(os.path.join(trace_dir, f'{name}.txt'), 'w') as f:
      f.write(profiler.key_averages().table(sort_by=sort, row_limit=40))
  timed = times[warmup:]
  median = statistics.median(timed)
  record = dict(
      framework='torch', mode=mode, model=model_name,
      variant=norm + ('+bf16' if amp else ''), norm=norm, compute_dtype=compute_dtype,
      amp=amp, channels_last=True, batch_size=batch_size, image_size=image_size, width=width,
      stem=stem, num_classes=num_classes, channels=channels,
      steps=len(timed), warmup=warmup, step_time_ms=1e3 * median,
      step_time_ms_min=1e3 * min(timed), step_time_ms_max=1e3 * max(timed),
      step_times_ms=[1e3 * t for t in timed], images_per_sec=batch_size / median,
      # As bnfree_jax.bench.common.cpu_record.
      step_cpu_ms=1e3 * statistics.median(cpu_times[warmup:]),
      step_cpu_times_ms=[1e3 * t for t in cpu_times[warmup:]],
      # The first step holds torch.compile's work (and cuDNN's autotuning).
      compile_s=times[0],
      peak_bytes=torch.cuda.max_memory_allocated(device) if device.type == 'cuda' else None,
      all_finite=bool(torch.isfinite(loss).item()), device=_device_name(device),
      torch_version=torch.__version__, torchvision_version=torchvision.__version__,
      opacus_version=_version('opacus') if norm == 'dp' else None,
      threads=torch.get_num_threads(), load_avg_start=load_start,
      load_avg_end=os.getloadavg()[0], other_cpu_cores=_other_cores(cpu_start, _cpu_seconds()),
      cpu_count=os.cpu_count(), host=platform.node(),
      trace_dir=trace_dir)
  return record


class BadInput(ValueError):
  """An argument this script cannot use."""


def _split(text, allowed, flag):
  items = [item.strip() for item in text.split(',') if item.strip()]
  for item in items or ['']:
    if item not in allowed:
      raise BadInput(f'{flag} {item!r} is not one of: {", ".join(allowed)}')
  return items


def _rows(args):
  """(model, norm, mode) of every row asked for, eager ones first; raises BadInput."""
  _split(args.compute_dtype, COMPUTE_DTYPES, '--compute-dtype')
  _split(args.device, ('cuda', 'cpu'), '--device')
  _split(args.stem, ('imagenet', *SMALL_STEMS), '--stem')
  if args.device == 'cuda' and not torch.cuda.is_available():
    raise BadInput('--device cuda: torch sees no CUDA device; allowed here: cpu')
  for name, value, minimum in (('--batch-size', args.batch_size, 1),
                               ('--image-size', args.image_size, 1), ('--width', args.width, 1),
                               ('--num-classes', args.num_classes, 2),
                               ('--channels', args.channels, 1),
                               ('--steps', args.steps, 1), ('--warmup', args.warmup, 0)):
    if value < minimum:
      raise BadInput(f'{name}={value} must be >= {minimum}')
  rows = [(model, norm, mode) for mode in _split(args.modes, MODES, '--modes')
          for model in _split(args.models, MODELS, '--models')
          for norm in _split(args.norms, NORMS, '--norms') if fits(model, norm)]
  if (args.width, args.stem) != (64, 'imagenet') and any(n == 'nf_agc' for _, n, _ in rows):
    raise BadInput('--width and --stem apply to the torchvision models, not to timm\'s nf_*')
  if not rows:
    raise BadInput(f'no --norms {args.norms} fits --models {args.models}: nf_agc goes '
                   'with the nf_* models only, batch and weight with the others')
  return rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--probe', action='store_true', help='print versions and exit')
  p.add_argument('--models', default='resnet18')
  p.add_argument('--norms', default=','.join(NORMS))
  p.add_argument('--modes', default=','.join(MODES))
  p.add_argument('--compute-dtype', default='bfloat16', help=' | '.join(COMPUTE_DTYPES))
  p.add_argument('--batch-size', type=int, default=256)
  p.add_argument('--image-size', type=int, default=224)
  p.add_argument('--width', type=int, default=64, help='channels of the first stage')
  p.add_argument('--num-classes', type=int, default=1000)
  p.add_argument('--channels', type=int, default=3, help='of the input images')
  p.add_argument('--stem', default='imagenet',
                 help='imagenet | small | small_s2 (3x3 stride 1 or 2, no max pool)')
  p.add_argument('--steps', type=int, default=20)
  p.add_argument('--warmup', type=int, default=3)
  p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                 help='cuda | cpu (default: cuda where available)')
  p.add_argument('--deadline', type=float, default=float('inf'),
                 help='time.time() after which no row starts (it is reported skipped)')
  p.add_argument('--trace', help='write a torch.profiler trace of the timed steps here')
  args = p.parse_args(argv)
  if args.probe:
    try:
      import timm
      timm_version = timm.__version__
    except ImportError:
      timm_version = None
    print(json.dumps(dict(torch_version=torch.__version__,
                          torchvision_version=torchvision.__version__,
                          timm_version=timm_version, cuda=torch.cuda.is_available())))
    return 0
  try:
    rows = _rows(args)
  except BadInput as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  device = torch.device(args.device)
  for model, norm, mode in rows:
    if time.time() > args.deadline:
      print(json.dumps(dict(framework='torch', mode=mode, model=model, norm=norm,
                            variant=norm + ('+bf16' if args.compute_dtype == 'bfloat16' else ''),
                            compute_dtype=args.compute_dtype, batch_size=args.batch_size,
                            image_size=args.image_size, skipped='time budget spent')),
            flush=True)
      continue
    _progress(f'{model} {norm} {mode} {args.compute_dtype} batch {args.batch_size}')
    print(json.dumps(measure(model, norm, mode, args.compute_dtype, args.batch_size,
                             args.image_size, args.steps, args.warmup, device, args.trace,
                             args.width, args.stem, args.num_classes, args.channels)),
          flush=True)
    # The row's model and optimizer are gone with measure(); its compiled
    # graphs and cached blocks go here, before the next row.
    torch._dynamo.reset()
    if device.type == 'cuda':
      torch.cuda.empty_cache()
  return 0


if __name__ == '__main__':
  sys.exit(main())
