"""Input pipelines: tfds, IDX or synthetic data -> normalized numpy batches.

Determinism contract: global batch s is a pure function of (config.seed, s).
Epoch e = s // steps_per_epoch reads examples in an order seeded by (seed, e)
and augments each one with stateless ops seeded by (seed, e, its position in
the epoch). Process i of P takes the contiguous rows [i*B/P, (i+1)*B/P) of each
global batch, and resuming skips undecoded records, so both reproduce the
single-process stream bit for bit. Nothing is ever downloaded.
"""

import dataclasses
import gzip
import itertools
import os
import struct
from typing import Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

# TF only feeds the host; the accelerators belong to JAX.
tf.config.set_visible_devices([], 'GPU')

DATASETS = ('imagenet2012', 'cifar10', 'cifar100', 'mnist', 'fashion_mnist',
            'synthetic')

# name: (num_classes, native image side, per-channel mean, std on a 0..1 scale).
# synthetic takes its classes and side from config.synthetic; its mean and std
# follow from how _synthetic draws pixels.
_SPECS = {
    'imagenet2012': (1000, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    'cifar10': (10, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    'cifar100': (100, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    'mnist': (10, 28, (0.1307,), (0.3081,)),
    'fashion_mnist': (10, 28, (0.2860,), (0.3530,)),
    'synthetic': (None, None, (0.5,), (0.24,)),
}
_IDX_FILES = ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz',
              't10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz')
_DEBIAN_IDX_DIRS = {'fashion_mnist': '/usr/share/datasets/fashion-mnist'}
_AUTOTUNE = tf.data.AUTOTUNE
_PREFETCH_BATCHES = 2


class DataNotFoundError(ValueError):
  """The dataset is not on this machine."""


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
  size = _image_size(config)
  if name == 'synthetic':
    s = config.synthetic
    return DatasetInfo(name, s.num_classes, (size, size, s.channels),
                       s.num_train, s.num_eval)
  num_classes, _, mean, _ = _SPECS[name]
  train, test = _tfds_split(config, True), _tfds_split(config, False)
  if train is not None and test is not None:
    counts = int(train.cardinality()), int(test.cardinality())
  else:
    directory = _idx_dir(config)
    counts = (_read_idx(os.path.join(directory, _IDX_FILES[1]), True)[0],
              _read_idx(os.path.join(directory, _IDX_FILES[3]), True)[0])
  return DatasetInfo(name, num_classes, (size, size, len(mean)), *counts)


def train_batches(config, *, start_step: int, local_batch_size: int,
                  process_index: int, process_count: int) -> Iterator[dict]:
  """Endless {'image': float32 [B, H, W, C], 'label': int32 [B]} batches."""
  info = dataset_info(config)
  global_batch = _global_batch(local_batch_size, process_index, process_count)
  steps_per_epoch = info.num_train // global_batch
  if steps_per_epoch == 0:
    raise ValueError(f'{info.num_train} training examples of {info.name} do '
                     f'not fill one global batch of {global_batch}')
  if start_step < 0:
    raise ValueError(f'start_step={start_step} must be >= 0')
  if info.name == 'imagenet2012':
    epoch_records = lambda epoch: _imagenet_train_records(config, epoch)
  else:
    images, labels = _arrays(config, train=True)
    epoch_records = lambda epoch: _array_records(
        images, labels, permutation(config.seed, epoch, len(labels)))
  preprocess = _preprocess_fn(config, train=True)

  def batches():
    for epoch in itertools.count(start_step // steps_per_epoch):
      aug_key = tf.constant(_epoch_keys(config.seed, epoch)[1], tf.int64)
      first = max(start_step - epoch * steps_per_epoch, 0) * global_batch
      ds = _local_rows(epoch_records(epoch), first,
                       steps_per_epoch * global_batch, local_batch_size,
                       process_index, process_count)
      ds = ds.map(
          lambda pos, ex: preprocess(ex, tf.stack([aug_key, pos])),
          num_parallel_calls=_AUTOTUNE, deterministic=True)
      ds = ds.batch(local_batch_size, drop_remainder=True)
      yield from _numpy_batches(ds)

  return batches()


def eval_batches(config, *, local_batch_size: int, process_index: int,
                 process_count: int) -> Iterator[dict]:
  """The eval split once, in order; 'mask' is False on the padding rows."""
  info = dataset_info(config)
  global_batch = _global_batch(local_batch_size, process_index, process_count)
  n = info.num_eval
  if info.name == 'imagenet2012':
    records = _tfds_split(config, False,
                          decoders={'image': tfds.decode.SkipDecoding()})
  else:
    images, labels = _arrays(config, train=False)
    records = _array_records(images, labels, np.arange(n))
  preprocess = _preprocess_fn(config, train=False)
  ds = _local_rows(records, 0, n, local_batch_size, process_index,
                   process_count)
  ds = ds.map(lambda pos, ex: {**preprocess(ex, None), 'mask': True},
              num_parallel_calls=_AUTOTUNE, deterministic=True)
  # Only the last global batch is short; this process's share of it is
  # whatever of its row range falls below n.
  num_batches = -(-n // global_batch)
  last_rows = n - (num_batches - 1) * global_batch
  real = ((num_batches - 1) * local_batch_size +
          min(max(last_rows - process_index * local_batch_size, 0),
              local_batch_size))
  padding = tf.data.Dataset.from_tensors({
      'image': tf.zeros(info.image_shape, tf.float32),
      'label': tf.constant(0, tf.int32),
      'mask': tf.constant(False),
  }).repeat(num_batches * local_batch_size - real)
  return _numpy_batches(ds.concatenate(padding).batch(local_batch_size))


def _numpy_batches(ds):
  """The batches as numpy, prefetched, with tf.data's autotuning off: deleting
  an autotuned iterator waits for its model thread to wake, which stalled the
  trainer 9-21 s at the end of each epoch, eval and run. Off, the maps keep
  their rate (python -m bnfree_jax.bench --input: README)."""
  options = tf.data.Options()
  options.autotune.enabled = False
  return ds.prefetch(_PREFETCH_BATCHES).with_options(options).as_numpy_iterator()


def permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """The order in which epoch `epoch` reads an in-memory training split."""
  return np.random.default_rng(_epoch_keys(seed, epoch)[0]).permutation(
      num_examples)


def load_idx(directory: str):
  """(train_images, train_labels, test_images, test_labels) of an IDX dir.

  Images are uint8 [N, 28, 28, 1], labels uint8 [N], as stored in the
  original MNIST / Fashion-MNIST `.gz` files.
  """
  arrays = [_read_idx(os.path.join(directory, f)) for f in _IDX_FILES]
  return arrays[0][..., None], arrays[1], arrays[2][..., None], arrays[3]


def _read_idx(path, header_only=False):
  with gzip.open(path, 'rb') as f:
    zeros, dtype_code, ndim = struct.unpack('>HBB', f.read(4))
    if zeros != 0 or dtype_code != 0x08:
      raise ValueError(f'{path} is not a uint8 IDX file')
    shape = struct.unpack(f'>{ndim}I', f.read(4 * ndim))
    if header_only:
      return shape
    return np.frombuffer(f.read(), np.uint8).reshape(shape)


def _image_size(config):
  native = (config.synthetic.image_size if config.dataset == 'synthetic'
            else _SPECS[config.dataset][1])
  return native if config.image_size == -1 else config.image_size


def _global_batch(local_batch_size, process_index, process_count):
  if local_batch_size <= 0:
    raise ValueError(f'local_batch_size={local_batch_size} must be > 0')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is not in '
                     f'[0, process_count={process_count})')
  return local_batch_size * process_count


def _epoch_keys(seed, epoch):
  """(order key, augmentation key) of one epoch, both uint32."""
  return np.random.SeedSequence([seed, epoch]).generate_state(2)


def _local_rows(records, start, stop, local_batch_size, process_index,
                process_count):
  """(position, record) of this process's rows among positions [start, stop).

  Rows are dropped before any decoding, so skipped steps and other processes'
  rows cost a record read at most.
  """
  return records.skip(start).take(stop - start).enumerate(start).filter(
      lambda pos, _: pos // local_batch_size % process_count == process_index)


def _array_records(images, labels, order):
  images, labels = tf.constant(images), tf.constant(labels)
  return tf.data.Dataset.from_tensor_slices(order).map(
      lambda i: {'image': tf.gather(images, i), 'label': tf.gather(labels, i)})


def _imagenet_train_records(config, epoch):
  # Too big to permute in memory: the epoch order is a seeded shuffle of the
  # files, then of a buffer of undecoded records.
  order_key = int(_epoch_keys(config.seed, epoch)[0])
  ds = _tfds_split(config, True, shuffle_seed=order_key,
                   decoders={'image': tfds.decode.SkipDecoding()})
  return ds.shuffle(config.shuffle_buffer, seed=order_key)


def _tfds_split(config, train, shuffle_seed=None, **as_dataset_kwargs):
  """The split as a tf.data.Dataset, or None when tfds has no prepared copy."""
  builder = tfds.builder(config.dataset, data_dir=config.data_dir or None)
  if train:
    split = 'train'
  else:
    split = 'validation' if config.dataset == 'imagenet2012' else 'test'
  # Every process must see the same record order: pin the file interleave
  # rather than rely on tfds' default.
  read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed,
                                interleave_cycle_length=16)
  try:
    return builder.as_dataset(split=split, read_config=read_config,
                              shuffle_files=shuffle_seed is not None,
                              **as_dataset_kwargs)
  except AssertionError:  # tfds' "could not find data"; never download.
    return None


def _arrays(config, train):
  """(uint8 images [N, H, W, C], labels [N]) of a split that fits in memory."""
  if config.dataset == 'synthetic':
    return _synthetic(config, train)
  ds = _tfds_split(config, train)
  if ds is not None:
    # Not as_dataset(batch_size=-1): it batches by info.splits, which is
    # empty under tfds.testing.mock_data.
    ex = next(ds.batch(int(ds.cardinality())).as_numpy_iterator())
    return ex['image'], ex['label']
  arrays = load_idx(_idx_dir(config))
  return arrays[:2] if train else arrays[2:]


def _idx_dir(config):
  """The first directory holding the four IDX files, else DataNotFoundError."""
  name = config.dataset
  tried = []
  if name in ('mnist', 'fashion_mnist'):
    if config.data_dir:
      tried += [config.data_dir, os.path.join(config.data_dir, name)]
    tried += [_DEBIAN_IDX_DIRS[name]] if name in _DEBIAN_IDX_DIRS else []
    for directory in tried:
      if all(os.path.exists(os.path.join(directory, f)) for f in _IDX_FILES):
        return directory
  root = tfds.builder(name, data_dir=config.data_dir or None).data_dir_root
  message = f'{name}: no prepared tfds copy under {root}'
  if name in ('mnist', 'fashion_mnist'):
    files = ', '.join(_IDX_FILES)
    message += (f' and no IDX files ({files}) in {tried}' if tried else
                f'; data_dir is empty, so no IDX files ({files}) were sought')
  if name == 'imagenet2012':
    message += ('. TFDS cannot download ImageNet: put ILSVRC2012_img_train.tar'
                f' and ILSVRC2012_img_val.tar in {root}/downloads/manual, then'
                f' run `tfds build imagenet2012 --data_dir={root}`.')
  else:
    message += (f'. Run `tfds build {name} --data_dir={root}` on a machine '
                'with internet and copy the result here')
    if name in ('mnist', 'fashion_mnist'):
      message += ', or set data_dir to a directory holding the IDX files'
    if name == 'fashion_mnist':
      message += ', or `apt-get install dataset-fashion-mnist`'
    message += '.'
  raise DataNotFoundError(message)


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


def _preprocess_fn(config, train):
  """fn(record, seed) -> {'image': normalized float32, 'label': int32}."""
  name, size = config.dataset, _image_size(config)
  _, _, mean, std = _SPECS[name]
  mean, std = 255 * np.array(mean, np.float32), 255 * np.array(std, np.float32)

  # Python-level branches on the dataset name: nothing for AutoGraph to convert.
  @tf.autograph.experimental.do_not_convert
  def fn(ex, seed):
    image = ex['image']
    if name == 'imagenet2012':
      image = _decode_crop(image, size, seed if train else None)
    elif train and name in ('cifar10', 'cifar100'):
      crop_seed, flip_seed = tf.unstack(tf.random.split(seed, 2))
      image = tf.image.stateless_random_crop(
          tf.pad(image, [[4, 4], [4, 4], [0, 0]]), tf.shape(image), crop_seed)
      image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    if tuple(image.shape[:2]) != (size, size):
      image = tf.image.resize(image, (size, size))
    image = (tf.cast(image, tf.float32) - mean) / std
    return {'image': image, 'label': tf.cast(ex['label'], tf.int32)}

  return fn


def _decode_crop(jpeg, size, seed):
  """Inception crop + flip when seeded, else the central 87.5% (224/256)."""
  shape = tf.image.extract_jpeg_shape(jpeg)
  if seed is not None:
    crop_seed, flip_seed = tf.unstack(tf.random.split(seed, 2))
    begin, crop, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, tf.zeros([0, 0, 4]), seed=crop_seed, min_object_covered=0.0,
        aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0),
        use_image_if_no_bounding_boxes=True)
    window = tf.stack([begin[0], begin[1], crop[0], crop[1]])
  else:
    side = tf.cast(0.875 * tf.cast(tf.reduce_min(shape[:2]), tf.float32),
                   tf.int32)
    window = tf.stack([(shape[0] - side) // 2, (shape[1] - side) // 2, side,
                       side])
  image = tf.image.resize(tf.io.decode_and_crop_jpeg(jpeg, window, channels=3),
                          (size, size))
  if seed is not None:
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  return image
