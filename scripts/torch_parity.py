"""Full-size check of bnfree_jax.convert against PyTorch: a torchvision ResNet
(random weights, nothing downloaded) converted by from_torch gives torch's
eval-mode logits. Prints the largest logit difference (and each side's from
torch's float64 logits), from_torch's time and whether to_torch gives the
state dict back bit for bit.

  python3 scripts/torch_parity.py --torch_python /work/torchenv/bin/python [--model resnet50]

The torch half runs in --torch_python (torch, torchvision, safetensors,
numpy): it writes the state dict, the images and torch's logits to a
temporary directory, which this python (with bnfree_jax) reads back. BN gets
random affines and running statistics taken from a batch of other images, so
that eval mode is neither the identity nor far off scale.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from safetensors.numpy import load_file, save_file


def torch_half(model_name, batch, image_size, out):
  import torch
  import torchvision

  torch.manual_seed(0)
  net = getattr(torchvision.models, model_name)(weights=None)
  batch_norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  with torch.no_grad():
    for m in batch_norms:
      m.weight.uniform_(0.5, 1.5)
      m.bias.normal_(0, 0.2)
      m.momentum = 1.0  # Running statistics := those of the next batch.
    net.train()(torch.randn(8, 3, image_size, image_size))
    for m in batch_norms:
      m.momentum = 0.1
    images = torch.randn(batch, 3, image_size, image_size)
    logits = net.eval()(images)
    save_file({k: v.numpy() for k, v in net.state_dict().items()},
              f'{out}/state_dict.safetensors')
    # The yardstick for both float32 results.
    logits64 = net.double()(images.double())
  np.savez(f'{out}/io.npz', images=images.permute(0, 2, 3, 1).numpy(), logits=logits.numpy(),
           logits64=logits64.numpy())


def jax_half(model_name, out, repeats):
  import jax

  from bnfree_jax import convert, models

  state_dict = load_file(f'{out}/state_dict.safetensors')
  io = np.load(f'{out}/io.npz')
  model = models.create_model(model_name)
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    variables = convert.from_torch(state_dict, model)
    seconds.append(time.perf_counter() - start)
  logits = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables,
                                                                           io['images']))
  back = convert.to_torch(variables, model)
  kept = {k: v for k, v in state_dict.items() if not k.endswith('num_batches_tracked')}
  return {
      'model': model_name,
      'images': list(io['images'].shape),
      'tensors': len(state_dict),
      'numbers': int(sum(v.size for v in kept.values())),  # Parameters and BN statistics.
      'max_abs_logit': float(np.abs(io['logits']).max()),
      'max_abs_logit_diff': float(np.abs(logits - io['logits']).max()),
      # Each float32 result against torch's float64 one.
      'max_abs_diff_jax_float64': float(np.abs(logits - io['logits64']).max()),
      'max_abs_diff_torch_float64': float(np.abs(io['logits'] - io['logits64']).max()),
      'from_torch_seconds': [round(s, 3) for s in seconds],
      'round_trip_bit_for_bit': back.keys() == kept.keys() and all(
          np.array_equal(back[k], kept[k]) for k in kept),
      'jax_devices': str(jax.devices()),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--torch_python', help='python with torch and torchvision')
  parser.add_argument('--model', default='resnet50', help='resnet18|34|50|101|152')
  parser.add_argument('--batch', type=int, default=2)
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--repeats', type=int, default=3, help='timed from_torch calls')
  parser.add_argument('--torch_half', metavar='DIR', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.torch_half:
    torch_half(args.model, args.batch, args.image_size, args.torch_half)
    return
  if not args.torch_python:
    parser.error('--torch_python is required')
  with tempfile.TemporaryDirectory() as out:
    subprocess.run([args.torch_python, os.path.abspath(__file__), '--torch_half', out,
                    '--model', args.model, '--batch', str(args.batch),
                    '--image_size', str(args.image_size)], check=True)
    print(json.dumps(jax_half(args.model, out, args.repeats), indent=2))


if __name__ == '__main__':
  sys.exit(main())
