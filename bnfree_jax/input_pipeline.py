"""Input pipelines: tfds, IDX or synthetic data -> normalized numpy batches.

Determinism contract: global batch s is a pure function of (config.seed, s).
Epoch e = s // steps_per_epoch reads examples in an order seeded by (seed, e)
and augments each one with stateless ops seeded by (seed, e, its position in
the epoch). Process i of P takes the contiguous rows [i*B/P, (i+1)*B/P) of each
global batch, and resuming skips undecoded records, so both reproduce the
single-process stream bit for bit. Nothing is ever downloaded.

config.train_subset > 0 keeps the first N examples of an in-memory training
split, in their stored order; the epochs above are then epochs of those N.

Data held in memory and fed as it is (synthetic, MNIST-style IDX files) is
batched here with numpy; everything else (tfds reading, JPEG decoding,
augmentation, resizing) goes through tf.data in input_tfds, which is the only
module that imports TensorFlow. What both read (each dataset's facts, the epoch
order) is in bnfree_jax.datasets: this module imports input_tfds, not back.
"""

import dataclasses
import gzip
import itertools
import os
import struct
from typing import Iterator

import numpy as np

from bnfree_jax import privacy
from bnfree_jax.datasets import (AUGMENTED, DATASETS, SPECS, image_size, native_size,
                                 normalization, permutation)

_IDX_FILES = ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz',
              't10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz')
_DEBIAN_IDX_DIRS = {'fashion_mnist': '/usr/share/datasets/fashion-mnist'}
_IDX_DATASETS = ('mnist', 'fashion_mnist')


class DataNotFoundError(ValueError):
  """The dataset is not on this machine, or needs a package that is not."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  name: str
  num_classes: int
  image_shape: tuple[int, int, int]  # (H, W, C) as fed to the model.
  num_train: int
  num_eval: int


def dataset_info(config) -> DatasetInfo:
  """Shapes and split sizes, from metadata and IDX headers only."""
  name = config.dataset
  if name not in DATASETS:
    raise ValueError(f'dataset={name!r} is not one of: {", ".join(DATASETS)}')
  _check_subset_dataset(config)
  size = image_size(config)
  if name == 'synthetic':
    s = config.synthetic
    return DatasetInfo(name, s.num_classes, (size, size, s.channels),
                       _subset_size(config, s.num_train), s.num_eval)
  num_classes, _, mean, _ = SPECS[name]
  counts = _tfds(config).num_examples(config) if _tfds_copy_possible(config) else None
  if counts is None:
    directory = _idx_dir(config)
    counts = (_read_idx(os.path.join(directory, _IDX_FILES[1]), True)[0],
              _read_idx(os.path.join(directory, _IDX_FILES[3]), True)[0])
  return DatasetInfo(name, num_classes, (size, size, len(mean)),
                     _subset_size(config, counts[0]), counts[1])


def data_source(config) -> str:
  """Where the data of config.dataset comes from: 'generated', 'tfds copy' or
  'IDX files'."""
  if config.dataset == 'synthetic':
    return 'generated'
  if _tfds_copy_possible(config) and _tfds(config).num_examples(config) is not None:
    return 'tfds copy'
  _idx_dir(config)
  return 'IDX files'


def train_batches(config, *, steps_per_epoch: int, start_step: int, local_batch_size: int,
                  process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
  """Endless {'image': float32 [B, H, W, C], 'label': int32 [B]} batches of
  local_batch_size rows, this process's share of each global batch;
  steps_per_epoch global batches make an epoch (train.Setup's)."""
  _check_shard(local_batch_size, process_index, process_count)
  if steps_per_epoch <= 0:
    raise ValueError(f'steps_per_epoch={steps_per_epoch} must be > 0')
  if start_step < 0:
    raise ValueError(f'start_step={start_step} must be >= 0')
  _check_subset_dataset(config)
  shard = dict(steps_per_epoch=steps_per_epoch, start_step=start_step,
               local_batch_size=local_batch_size, process_index=process_index,
               process_count=process_count)
  if config.dataset == 'imagenet2012':
    return _tfds(config).train_batches(config, None, **shard)
  arrays = _arrays(config, train=True)
  if _as_stored(config, train=True):
    return _numpy_train_batches(config, *arrays, **shard)
  return _tfds(config).train_batches(config, arrays, **shard)


def dp_train_batches(config, *, start_step: int, process_index: int = 0,
                     process_count: int = 1) -> Iterator[list[dict]]:
  """Endless DP-SGD steps from start_step on: each a list of micro-batches
  {'image', 'label', 'index' (into the training split), 'mask' (False on
  padding)}, this process's rows of each; the examples as stored (only
  normalized: DP augments on the device, see config.dp.augmult). Which
  examples a step holds: privacy.step_indices."""
  _check_shard(config.dp.microbatch_size // process_count, process_index, process_count)
  images, labels = _arrays(config, train=True)
  for step in itertools.count(start_step):
    indices = privacy.step_indices(config.dp.sampling, config.seed, step, len(labels),
                                   config.batch_size)
    yield [{'image': _normalize(config, images[rows]), 'label': labels[rows].astype(np.int32),
            'index': rows.astype(np.int32), 'mask': mask}
           for rows, mask in privacy.microbatches(indices, config.dp.microbatch_size,
                                                  process_index=process_index,
                                                  process_count=process_count)]


def eval_batches(config, *, local_batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict]:
  """The eval split once, in order; 'mask' is False on the padding rows."""
  _check_shard(local_batch_size, process_index, process_count)
  info = dataset_info(config)
  shard = dict(local_batch_size=local_batch_size, process_index=process_index,
               process_count=process_count)
  if config.dataset == 'imagenet2012':
    return _tfds(config).eval_batches(config, None, num_eval=info.num_eval,
                                image_shape=info.image_shape, **shard)
  arrays = _arrays(config, train=False)
  if _as_stored(config, train=False):
    return _numpy_eval_batches(config, *arrays, **shard)
  return _tfds(config).eval_batches(config, arrays, num_eval=info.num_eval,
                              image_shape=info.image_shape, **shard)


def train_split_batches(config, *, batch_size: int) -> Iterator[dict]:
  """The training split once, in order, as stored (only normalized), every
  process all of it; 'mask' is False on the padding rows. What a DP run's
  released statistics of the whole split (dp.feature_mean_noise) read."""
  return _numpy_eval_batches(config, *_arrays(config, train=True), local_batch_size=batch_size,
                             process_index=0, process_count=1)


def load_idx(directory: str):
  """(train_images, train_labels, test_images, test_labels) of an IDX dir.

  Images are uint8 [N, 28, 28, 1], labels uint8 [N], as stored in the
  original MNIST / Fashion-MNIST `.gz` files.
  """
  arrays = [_read_idx(os.path.join(directory, f)) for f in _IDX_FILES]
  return arrays[0][..., None], arrays[1], arrays[2][..., None], arrays[3]


# --------------------------------------------------------- numpy batches ----


def _as_stored(config, train: bool) -> bool:
  """Whether the split is fed as stored (only normalized), so numpy does it."""
  return (image_size(config) == native_size(config)
          and not (train and config.dataset in AUGMENTED))


def _normalize(config, images):
  mean, std = normalization(config.dataset)
  return (images.astype(np.float32) - mean) / std


def _numpy_train_batches(config, images, labels, *, steps_per_epoch, start_step,
                         local_batch_size, process_index, process_count):
  global_batch = local_batch_size * process_count
  for epoch in itertools.count(start_step // steps_per_epoch):
    order = permutation(config.seed, epoch, len(labels))
    for step in range(max(start_step - epoch * steps_per_epoch, 0), steps_per_epoch):
      first = step * global_batch + process_index * local_batch_size
      rows = order[first:first + local_batch_size]
      yield {'image': _normalize(config, images[rows]),
             'label': labels[rows].astype(np.int32)}


def _numpy_eval_batches(config, images, labels, *, local_batch_size, process_index,
                        process_count):
  n, global_batch = len(labels), local_batch_size * process_count
  for first in range(0, n, global_batch):
    start = min(first + process_index * local_batch_size, n)
    stop = min(start + local_batch_size, n)
    pad = local_batch_size - (stop - start)
    image = _normalize(config, images[start:stop])
    yield {'image': np.concatenate([image, np.zeros((pad, *image.shape[1:]), np.float32)]),
           'label': np.concatenate([labels[start:stop].astype(np.int32),
                                    np.zeros(pad, np.int32)]),
           'mask': np.arange(local_batch_size) < stop - start}


def _check_shard(local_batch_size, process_index, process_count):
  if local_batch_size <= 0:
    raise ValueError(f'local_batch_size={local_batch_size} must be > 0')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is not in '
                     f'[0, process_count={process_count})')


# ------------------------------------------------------------ the splits ----


def _tfds(config):
  """The tf.data half, imported on first use: TensorFlow is needed for tfds
  data, JPEGs, augmentation and resizing only."""
  try:
    from bnfree_jax import input_tfds
  except ImportError as e:
    raise DataNotFoundError(
        f'dataset={config.dataset} (as configured) needs TensorFlow and tensorflow-datasets '
        f'({e}): pip install tensorflow-cpu tensorflow-datasets') from e
  return input_tfds


def _tfds_copy_possible(config) -> bool:
  """Whether a tfds copy may be read: IDX datasets are read without
  TensorFlow where it is missing; the others need it (and _tfds says so)."""
  if config.dataset not in _IDX_DATASETS:
    return True
  try:
    _tfds(config)
  except DataNotFoundError:
    return False
  return True


def _arrays(config, train):
  """(uint8 images [N, H, W, C], labels [N]) of a split that fits in memory;
  of the training split, its first config.train_subset examples."""
  if config.dataset == 'synthetic':
    arrays = _synthetic(config, train)
  else:
    arrays = _tfds(config).arrays(config, train) if _tfds_copy_possible(config) else None
    if arrays is None:
      idx = load_idx(_idx_dir(config))
      arrays = idx[:2] if train else idx[2:]
  if not train:
    return arrays
  n = _subset_size(config, len(arrays[1]))
  return arrays[0][:n], arrays[1][:n]


def _check_subset_dataset(config):
  """imagenet2012 is read record by record, never held whole: no subset."""
  if config.train_subset != -1 and config.dataset == 'imagenet2012':
    raise ValueError(f'train_subset={config.train_subset} is for the datasets held in '
                     'memory, not imagenet2012 (streamed): leave it at -1')


def _subset_size(config, num_train):
  """How many training examples are used of the split's num_train."""
  n = config.train_subset
  if n == -1:
    return num_train
  if not 0 < n <= num_train:
    raise ValueError(f'train_subset={n} is not -1 (all) or in 1..{num_train}, the size of '
                     f'the {config.dataset} training split')
  return n


def _idx_dir(config):
  """The first directory holding the four IDX files, else DataNotFoundError."""
  name = config.dataset
  tried = []
  if name in _IDX_DATASETS:
    if config.data_dir:
      tried += [config.data_dir, os.path.join(config.data_dir, name)]
    tried += [_DEBIAN_IDX_DIRS[name]] if name in _DEBIAN_IDX_DIRS else []
    for directory in tried:
      if all(os.path.exists(os.path.join(directory, f)) for f in _IDX_FILES):
        return directory
  if not _tfds_copy_possible(config):
    root = None
    message = f'{name}: no tfds copy sought (TensorFlow is not installed)'
  else:
    root = _tfds(config).data_dir_root(config)
    message = f'{name}: no prepared tfds copy under {root}'
  if name in _IDX_DATASETS:
    files = ', '.join(_IDX_FILES)
    message += (f' and no IDX files ({files}) in {tried}' if tried else
                f'; data_dir is empty, so no IDX files ({files}) were sought')
  if name == 'imagenet2012':
    message += ('. TFDS cannot download ImageNet: put ILSVRC2012_img_train.tar'
                f' and ILSVRC2012_img_val.tar in {root}/downloads/manual, then'
                f' run `tfds build imagenet2012 --data_dir={root}`.')
  else:
    message += (f'. Run `tfds build {name} --data_dir={root or "DIR"}` on a machine '
                'with internet and copy the result here')
    if name in _IDX_DATASETS:
      message += ', or set data_dir to a directory holding the IDX files'
    if name == 'fashion_mnist':
      message += ', or `apt-get install dataset-fashion-mnist`'
    message += '.'
  raise DataNotFoundError(message)


def _read_idx(path, header_only=False):
  with gzip.open(path, 'rb') as f:
    zeros, dtype_code, ndim = struct.unpack('>HBB', f.read(4))
    if zeros != 0 or dtype_code != 0x08:
      raise ValueError(f'{path} is not a uint8 IDX file')
    shape = struct.unpack(f'>{ndim}I', f.read(4 * ndim))
    if header_only:
      return shape
    return np.frombuffer(f.read(), np.uint8).reshape(shape)


def _synthetic(config, train):
  """Class-conditional images: a fixed random pattern per class plus noise."""
  s = config.synthetic
  shape = (s.image_size, s.image_size, s.channels)
  # Both splits share the class patterns, so what is learnt transfers.
  patterns = np.random.default_rng([config.seed, 1]).uniform(
      64, 192, (s.num_classes, *shape))
  rng = np.random.default_rng([config.seed, 2 if train else 3])
  labels = rng.integers(s.num_classes, size=s.num_train if train else s.num_eval)
  images = patterns[labels] + rng.normal(0, 48, (len(labels), *shape))
  return np.clip(np.rint(images), 0, 255).astype(np.uint8), labels
