"""The tf.data half of the input pipeline: tfds splits, ImageNet's JPEG
decoding and augmentation, CIFAR's pad-crop-flip, and resizing. Imported by
bnfree_jax.input_pipeline only for data that needs it, so that synthetic and
IDX data run where TensorFlow is not installed.

The determinism contract is input_pipeline's: global batch s is a pure
function of (config.seed, s), whichever half produces it.
"""

import itertools
from typing import Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from bnfree_jax.datasets import AUGMENTED, epoch_keys, image_size, normalization, permutation

# TF only feeds the host; the accelerators belong to JAX.
tf.config.set_visible_devices([], 'GPU')

_AUTOTUNE = tf.data.AUTOTUNE
_PREFETCH_BATCHES = 2


def train_batches(config, arrays, *, steps_per_epoch: int, start_step: int,
                  local_batch_size: int, process_index: int,
                  process_count: int) -> Iterator[dict]:
  """input_pipeline.train_batches through tf.data: arrays is the split in
  memory, (images, labels), or None for ImageNet's records."""
  global_batch = local_batch_size * process_count
  if arrays is None:
    epoch_records = lambda epoch: _imagenet_train_records(config, epoch)
  else:
    images, labels = arrays
    epoch_records = lambda epoch: _array_records(
        images, labels, permutation(config.seed, epoch, len(labels)))
  preprocess = _preprocess_fn(config, train=True)

  def batches():
    for epoch in itertools.count(start_step // steps_per_epoch):
      aug_key = tf.constant(epoch_keys(config.seed, epoch)[1], tf.int64)
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


def eval_batches(config, arrays, *, num_eval: int, image_shape, local_batch_size: int,
                 process_index: int, process_count: int) -> Iterator[dict]:
  """input_pipeline.eval_batches through tf.data (arrays as in train_batches)."""
  global_batch = local_batch_size * process_count
  n = num_eval
  if arrays is None:
    records = split(config, False, decoders={'image': tfds.decode.SkipDecoding()})
  else:
    images, labels = arrays
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
      'image': tf.zeros(image_shape, tf.float32),
      'label': tf.constant(0, tf.int32),
      'mask': tf.constant(False),
  }).repeat(num_batches * local_batch_size - real)
  return _numpy_batches(ds.concatenate(padding).batch(local_batch_size))


def _numpy_batches(ds):
  """The batches as numpy, prefetched, with tf.data's autotuning off: deleting
  an autotuned iterator waits for its model thread to wake, which stalled the
  trainer 9-21 s at the end of each epoch, eval and run. Off, the maps keep
  their rate (python -m bnfree_jax.bench --input: docs/speed_and_memory.md)."""
  options = tf.data.Options()
  options.autotune.enabled = False
  return ds.prefetch(_PREFETCH_BATCHES).with_options(options).as_numpy_iterator()


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
  order_key = int(epoch_keys(config.seed, epoch)[0])
  ds = split(config, True, shuffle_seed=order_key,
                   decoders={'image': tfds.decode.SkipDecoding()})
  return ds.shuffle(config.shuffle_buffer, seed=order_key)


def split(config, train, shuffle_seed=None, **as_dataset_kwargs):
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


def arrays(config, train):
  """(uint8 images [N, H, W, C], labels [N]) of a tfds split, or None when
  tfds has no prepared copy."""
  ds = split(config, train)
  if ds is None:
    return None
  # Not as_dataset(batch_size=-1): it batches by info.splits, which is empty
  # under tfds.testing.mock_data.
  ex = next(ds.batch(int(ds.cardinality())).as_numpy_iterator())
  return ex['image'], ex['label']


def num_examples(config) -> tuple[int, int] | None:
  """(train, eval) split sizes of the tfds copy, or None without one."""
  train, test = split(config, True), split(config, False)
  return None if train is None or test is None else (int(train.cardinality()),
                                                     int(test.cardinality()))


def data_dir_root(config) -> str:
  return tfds.builder(config.dataset, data_dir=config.data_dir or None).data_dir_root


def _preprocess_fn(config, train):
  """fn(record, seed) -> {'image': normalized float32, 'label': int32}."""
  name, size = config.dataset, image_size(config)
  mean, std = normalization(name)

  # Python-level branches on the dataset name: nothing for AutoGraph to convert.
  @tf.autograph.experimental.do_not_convert
  def fn(ex, seed):
    image = ex['image']
    if name == 'imagenet2012':
      image = _decode_crop(image, size, seed if train else None)
    elif train and name in AUGMENTED:
      crop_seed, flip_seed = tf.unstack(tf.random.split(seed, 2))
      image = tf.image.stateless_random_crop(
          tf.pad(image, [[4, 4], [4, 4], [0, 0]]), tf.shape(image), crop_seed)
      image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    if tuple(image.shape[:2]) != (size, size):
      image = _resize(image, size)
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
  image = _resize(tf.io.decode_and_crop_jpeg(jpeg, window, channels=3), size)
  if seed is not None:
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  return image


def _resize(image, size):
  """Bilinear to size x size, antialiased as PIL's (torchvision's) bilinear:
  downsizing widens the filter to the scale, so every source pixel counts;
  without it a crop shrunk to a third is sampled at a few pixels and aliases.
  Upsizing is plain bilinear either way. Float32 out."""
  return tf.image.resize(image, (size, size), antialias=True)
