"""Weights from and to PyTorch: state dicts <-> the variables of bnfree_jax models.

  variables = from_torch(state_dict, model)   # {'params': ..., 'batch_stats': ...}
  state_dict = to_torch(variables, model)     # the exact inverse

A model family is one layout function: given the model and its abstract
variables (flattened, keys (collection, *path)), it lists one Entry per flax
leaf saying which PyTorch tensor holds it and how its axes differ. Everything
else, from the shape checks to the error messages, is generic. To add a family,
write its layout and register it in LAYOUTS under its module class.

Command line (exit code 2 and one line on stderr for bad input):

  python -m bnfree_jax.convert WEIGHTS --config CONFIG.py[:arg] --workdir DIR [--config.x=y]
  python -m bnfree_jax.convert --export OUT.safetensors --config CONFIG.py --workdir DIR

The first writes WEIGHTS (.safetensors, .npz, or .pth/.pt with torch
installed) as the checkpoint of step 0 of a new run in DIR, which
`python -m bnfree_jax.main --config ... --workdir DIR --config.eval_only=True`
evaluates and a run without eval_only fine-tunes. The second writes the newest
checkpoint of DIR as a state dict (.safetensors or .npz).
"""

import os
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

# TF (imported for tfds data) serves input only: silence its start-up chatter.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import safetensors.numpy  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from bnfree_jax import checkpointing, models, train, workdir as workdirs  # noqa: E402
from bnfree_jax.main import CONFIG_ERRORS, config_error  # noqa: E402
from bnfree_jax.models.nf_resnet import NFBottleneckBlock, NFResNet  # noqa: E402
from bnfree_jax.workdir import EXIT_BAD_INPUT  # noqa: E402


class Entry(NamedTuple):
  """One tensor: its PyTorch name, where flax keeps it, and the axis change."""
  torch_key: str
  collection: str
  path: tuple[str, ...]
  transform: str


# name -> (PyTorch -> flax, flax -> PyTorch), both exact, so round trips are bit for bit.
TRANSFORMS: dict[str, tuple[Callable, Callable]] = {
    'copy': (lambda a: a, lambda a: a),
    'conv': (lambda a: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1)),  # OIHW, HWIO
    'linear': (lambda a: a.T, lambda a: a.T),  # (out, in), (in, out)
    # A per-filter vector: weight norm's g, weight standardization's gain.
    'per_filter': (lambda a: a.reshape(-1), lambda a: a.reshape(-1, 1, 1, 1)),  # (O, 1, 1, 1), (O,)
}

# Names older PyTorch (torch.nn.utils.weight_norm) gave a weight-normalized weight's g and v.
_OLD_WEIGHT_NORM = {'.weight_g': '.parametrizations.weight.original0',
                    '.weight_v': '.parametrizations.weight.original1'}


# -------------------------------------------------------------- layouts ----

# bnfree_jax module name -> torchvision's, for the names that do not follow a pattern.
_RESNET_MODULES = {'stem_conv': 'conv1', 'stem_norm': 'bn1', 'proj_conv': 'downsample.0',
                   'proj_norm': 'downsample.1', 'head': 'fc'}
# (collection, flax leaf) -> (PyTorch leaf, transform); None: by the kernel's rank.
_RESNET_LEAVES = {
    ('params', 'kernel'): ('weight', None),
    ('params', 'bias'): ('bias', 'copy'),
    ('params', 'scale'): ('weight', 'copy'),
    ('params', 'v'): ('parametrizations.weight.original1', 'conv'),
    ('params', 'g'): ('parametrizations.weight.original0', 'per_filter'),
    ('batch_stats', 'mean'): ('running_mean', 'copy'),
    ('batch_stats', 'var'): ('running_var', 'copy'),
}


def _resnet_module(name: str) -> str:
  if name in _RESNET_MODULES:
    return _RESNET_MODULES[name]
  if m := re.fullmatch(r'stage(\d+)_block(\d+)', name):
    return f'layer{m[1]}.{m[2]}'
  if re.fullmatch(r'conv\d', name):
    return name
  if m := re.fullmatch(r'norm(\d)', name):
    return f'bn{m[1]}'
  raise ValueError(f'ResNet module {name!r} has no torchvision name')


# Ranks of the names that do not say their place themselves; see _torchvision_order.
_TORCHVISION_RANKS = {'weight': 0, 'bias': 1, 'running_mean': 2, 'running_var': 3,
                      'parametrizations': 4, 'original0': 0, 'original1': 1,
                      'downsample': 9, 'fc': 99}


def _torchvision_order(key: str) -> list[tuple]:
  """Sort key giving torchvision's state dict order: stem, layer1..4, fc; conv{k},
  bn{k}, conv{k+1}, .., downsample in a block; so the first error is the
  first layer that does not fit."""
  order = []
  for part in key.split('.'):
    if m := re.fullmatch(r'(conv|bn)(\d)', part):
      order.append((int(m[2]), m[1] == 'bn'))
    elif m := re.fullmatch(r'layer(\d)', part):
      order.append((10 + int(m[1]),))
    else:
      order.append((int(part),) if part.isdigit() else (_TORCHVISION_RANKS[part],))
  return order


def resnet_layout(model, abstract: dict) -> list[Entry]:
  """torchvision's ResNet (conv1, bn1, layer{i}.{j}.conv1.., downsample, fc); with
  norm='weight' each conv under parametrizations.weight_norm, with a bias."""
  del model  # The names follow from the variables alone.
  entries = []
  for (collection, *modules, leaf), value in abstract.items():
    torch_leaf, transform = _RESNET_LEAVES[collection, leaf]
    if transform is None:
      transform = 'conv' if value.ndim == 4 else 'linear'
    prefix = '.'.join(_resnet_module(m) for m in modules)
    entries.append(Entry(f'{prefix}.{torch_leaf}', collection, (*modules, leaf), transform))
  return sorted(entries, key=lambda e: _torchvision_order(e.torch_key))


def timm_nf_resnet_layout(model: NFResNet, abstract: dict) -> list[Entry]:
  """timm's NormFreeNet nf_resnet26/50/101 (any channel config): stem.conv,
  stages.{s}.{i}.{downsample.conv, conv1..3}, head.fc; each conv a
  ScaledStdConv2d (weight, bias, gain)."""
  del abstract  # The names follow from the model's block list.
  if model.block_cls is not NFBottleneckBlock:
    raise ValueError(f'{model.block_cls.__name__} is not one of: NFBottleneckBlock '
                     '(timm has no basic-block NF-ResNet)')

  def ws_conv(torch_prefix, path):
    return [Entry(f'{torch_prefix}.weight', 'params', (*path, 'kernel'), 'conv'),
            Entry(f'{torch_prefix}.bias', 'params', (*path, 'bias'), 'copy'),
            Entry(f'{torch_prefix}.gain', 'params', (*path, 'gain'), 'per_filter')]

  entries = ws_conv('stem.conv', ('stem_conv',))
  for spec in model.blocks():
    prefix = f'stages.{spec.stage}.{spec.index}'
    if spec.projects:
      entries += ws_conv(f'{prefix}.downsample.conv', (spec.name, 'proj_conv'))
    for conv in ('conv1', 'conv2', 'conv3'):
      entries += ws_conv(f'{prefix}.{conv}', (spec.name, conv))
  return entries + [Entry('head.fc.weight', 'params', ('head', 'kernel'), 'linear'),
                    Entry('head.fc.bias', 'params', ('head', 'bias'), 'copy')]


# Module class -> layout. A ResNet18..152 instance is a ResNet.
LAYOUTS: dict[type, Callable[[Any, dict], list[Entry]]] = {
    models.ResNet: resnet_layout, NFResNet: timm_nf_resnet_layout}


# ------------------------------------------------------------ machinery ----


def _abstract_variables(model, channels: int) -> dict:
  """{(collection, *path): ShapeDtypeStruct} of model.init, computing nothing."""
  key = jax.random.key(0)
  image = jax.ShapeDtypeStruct((1, 32, 32, channels), jnp.float32)
  abstract = jax.eval_shape(lambda x: model.init({'params': key, 'dropout': key}, x, train=False),
                            image)
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(abstract))


def _plan(model, channels: int) -> tuple[dict, list[Entry]]:
  """model's abstract variables, and its layout's entries, one per variable."""
  layout = LAYOUTS.get(type(model))
  if layout is None:
    raise ValueError(f'no PyTorch layout for {type(model).__name__}; known: '
                     f'{", ".join(c.__name__ for c in LAYOUTS)}')
  abstract = _abstract_variables(model, channels)
  entries = layout(model, abstract)
  missed = set(abstract) - {(e.collection, *e.path) for e in entries}
  if missed:
    raise ValueError(f'the {type(model).__name__} layout leaves out '
                     f'{"/".join(sorted(missed)[0])}')
  return abstract, entries


def _torch_shape(entry: Entry, shape: tuple[int, ...]) -> tuple[int, ...]:
  # A zero-strided view: transposing or reshaping it allocates nothing.
  return TRANSFORMS[entry.transform][1](np.broadcast_to(np.float32(0), shape)).shape


def _canonical(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The state dict without BN's num_batches_tracked (flax keeps no such
  count), weight-norm tensors under their parametrizations names."""
  out = {}
  for key, value in state_dict.items():
    if key.endswith('.num_batches_tracked'):
      continue
    for old, new in _OLD_WEIGHT_NORM.items():
      if key.endswith(old):
        key = key[:-len(old)] + new
        if key in state_dict:
          raise ValueError(f'state dict holds both {key!r} and its old name ending {old!r}')
    out[key] = np.asarray(value)
  return out


def _raise_first(problems: list[str]):
  if problems:
    more = f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''
    raise ValueError(problems[0] + more)


def from_torch(state_dict: Mapping[str, Any], model, *, channels: int = 3) -> dict:
  """The variables ({'params', 'batch_stats'}, numpy arrays) of `model` held in
  a PyTorch state dict ({name: array}, num_batches_tracked optional).

  channels: of the input images (3 for RGB). Every tensor must fill one
  variable and every variable be filled; otherwise ValueError names the first
  key that does not fit, with its shape and the one the model expects.
  """
  abstract, entries = _plan(model, channels)
  tensors = _canonical(state_dict)
  variables, problems = {}, []
  for e in entries:
    want = abstract[(e.collection, *e.path)]
    torch_shape = _torch_shape(e, want.shape)
    if e.torch_key not in tensors:
      problems.append(f'state dict has no {e.torch_key!r}; the model expects shape {torch_shape}')
    elif tensors[e.torch_key].shape != torch_shape:
      problems.append(f'state dict key {e.torch_key!r} has shape {tensors[e.torch_key].shape}, '
                      f'the model expects {torch_shape}')
    else:
      value = TRANSFORMS[e.transform][0](tensors[e.torch_key])
      variables[(e.collection, *e.path)] = np.ascontiguousarray(value, dtype=want.dtype)
  used = {e.torch_key for e in entries}
  problems += [f'state dict key {k!r} (shape {v.shape}) matches no variable of the model'
               for k, v in tensors.items() if k not in used]
  _raise_first(problems)
  return {'batch_stats': {}, **flax.traverse_util.unflatten_dict(variables)}


def to_torch(variables: Mapping[str, Any], model, *, channels: int = 3) -> dict[str, np.ndarray]:
  """The PyTorch state dict of `model`'s variables: the inverse of from_torch,
  without num_batches_tracked (PyTorch fills it in on load)."""
  abstract, entries = _plan(model, channels)
  given = flax.traverse_util.flatten_dict(flax.core.unfreeze(dict(variables)))
  problems = []
  for e in entries:
    path, want = (e.collection, *e.path), abstract[(e.collection, *e.path)].shape
    if path not in given:
      problems.append(f'variables have no {"/".join(path)}; the model expects shape {want}')
    elif np.shape(given[path]) != want:
      problems.append(f'variable {"/".join(path)} has shape {np.shape(given[path])}, the model '
                      f'expects {want}')
  problems += [f'variable {"/".join(k)} (shape {np.shape(v)}) is not a variable of the model'
               for k, v in given.items() if k not in abstract]
  _raise_first(problems)
  return {e.torch_key: np.ascontiguousarray(
              TRANSFORMS[e.transform][1](np.asarray(given[(e.collection, *e.path)])))
          for e in entries}


# --------------------------------------------------------- command line ----


def _read_torch(path: str) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError:
    raise ValueError(f'reading {path} needs PyTorch: pip install torch, or save the '
                     'state dict as .safetensors where torch is installed') from None
  state_dict = torch.load(path, map_location='cpu', weights_only=True)
  # Training scripts often save the state dict inside a dict of their own.
  for wrapper in ('state_dict', 'model'):
    if isinstance(state_dict.get(wrapper), Mapping):
      state_dict = state_dict[wrapper]
  return {k: v.numpy() for k, v in state_dict.items()}


def _read_npz(path: str) -> dict[str, np.ndarray]:
  with np.load(path) as f:
    return dict(f)


READERS = {'.safetensors': safetensors.numpy.load_file, '.npz': _read_npz,
           '.pth': _read_torch, '.pt': _read_torch}
WRITERS = {'.safetensors': safetensors.numpy.save_file, '.npz': lambda tensors, path:
           np.savez(path, **tensors)}


def _file_type(path: str, allowed: Mapping) -> str:
  ext = os.path.splitext(path)[1]
  if ext not in allowed:
    raise ValueError(f'{path}: unknown file type {ext or "(none)"!r}; allowed: '
                     f'{", ".join(allowed)}')
  return ext


def read_weights(path: str) -> dict[str, np.ndarray]:
  """The state dict in a .safetensors, .npz or (with torch) .pth/.pt file."""
  ext = _file_type(path, READERS)
  if not os.path.isfile(path):
    raise ValueError(f'weights file {path} does not exist')
  try:
    return READERS[ext](path)
  except ValueError:
    raise
  except Exception as e:  # Each reader raises its own types for a damaged file.
    raise ValueError(f'{path} cannot be read as {ext}: {type(e).__name__}: '
                     f'{str(e).splitlines()[0] if str(e) else ""}') from e


def _import_weights(config, workdir: str, path: str):
  """WEIGHTS -> the checkpoint of step 0 and config.json of a new run in workdir."""
  state_dict = read_weights(path)
  s = train.setup(config)
  variables = from_torch(state_dict, s.model, channels=s.info.image_shape[-1])
  if workdirs.latest_checkpoint_step(workdir) is not None:
    raise ValueError(f'workdir {workdir} already holds checkpoints; converted weights start '
                     'a new run: use another --workdir')
  workdirs.prepare_workdir(config, workdir)

  replicated = jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec())
  # The optimizer state of fresh parameters does not depend on their values.
  state = train.init_state(s).replace(params=jax.device_put(variables['params'], replicated),
                                      batch_stats=jax.device_put(variables['batch_stats'],
                                                                 replicated))
  mngr = checkpointing.manager(workdir, keep=config.keep_checkpoints)
  try:
    checkpointing.save(mngr, 0, state)
  finally:
    mngr.close()  # Waits for the save.
  print(f'{path}: {len(state_dict)} tensors -> step 0 in {mngr.directory}')


def _export(config, workdir: str, path: str):
  """The newest checkpoint in workdir -> a state dict in path."""
  ext = _file_type(path, WRITERS)
  if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
    raise ValueError(f'{path}: directory {os.path.dirname(os.path.abspath(path))} does not exist')
  if workdirs.latest_checkpoint_step(workdir) is None:
    raise ValueError(f'workdir {workdir} has no checkpoint to export')
  s = train.setup(config)
  # A config of another model would fail in the restore, with a long message.
  workdirs.check_workdir(config, workdir)
  replicated = jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec())
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                          jax.eval_shape(lambda: train.init_state(s)))
  mngr = checkpointing.manager(workdir, keep=config.keep_checkpoints)
  try:
    state = checkpointing.restore_latest(mngr, abstract)
  finally:
    mngr.close()
  state_dict = to_torch({'params': state.params, 'batch_stats': state.batch_stats}, s.model,
                        channels=s.info.image_shape[-1])
  WRITERS[ext](state_dict, path)
  print(f'step {int(state.step)} of {workdir}: {len(state_dict)} tensors -> {path}')


def _flag_values(argv) -> flags.FlagValues:
  # A fresh set per call, told its argv, as main.py's: run() can be called again.
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'Config file (CONFIG.py or CONFIG.py:arg) '
                                  'of the run.', flag_values=fv, lock_config=True, sys_argv=argv)
  flags.DEFINE_string('workdir', None, 'Run directory: the new run, or with --export the one '
                      'to read.', flag_values=fv)
  flags.DEFINE_string('export', None, 'Write the newest checkpoint of --workdir to this '
                      '.safetensors or .npz file.', flag_values=fv)
  return fv


def _fail(message: str) -> int:
  print(f'error: {message}', file=sys.stderr)
  return EXIT_BAD_INPUT


def run(argv=None) -> int:
  argv = sys.argv if argv is None else argv
  fv = _flag_values(argv)
  if any(a in ('-h', '--help', '-help') for a in argv[1:]):
    print(__doc__.split('Command line', 1)[1].split('\n', 1)[1] + '\n' + fv.get_help())
    return 0
  try:
    weights = fv(argv)[1:]
    if fv['config'].present == 0 or fv.workdir is None:
      return _fail('--config and --workdir are both required')
    if len(weights) != (fv.export is None):
      return _fail(f'give one WEIGHTS file to convert, or --export OUT and none; got '
                   f'{len(weights)}: {" ".join(weights)}')
    config = fv.config
    config.keys()  # config_flags defers a failure to load the file to here.
  except CONFIG_ERRORS as e:
    return _fail(config_error(e))
  try:
    if fv.export is None:
      _import_weights(config, fv.workdir, weights[0])
    else:
      _export(config, fv.workdir, fv.export)
  except ValueError as e:  # The trainer's InputError and checkpointing's errors are ValueErrors.
    return _fail(str(e))
  return 0


if __name__ == '__main__':
  sys.exit(run())
