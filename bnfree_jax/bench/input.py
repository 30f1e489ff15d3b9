"""The input pipeline alone (images/s), beside what the train step consumes.

The one benchmark that needs TensorFlow (tf.data decodes and augments, tfds
mocks ImageNet), so bnfree_jax.bench imports this module only for --input.
"""

import contextlib
import json
import os
import time

# TF serves input only: silence its start-up chatter (as bnfree_jax.main does).
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from bnfree_jax import input_pipeline, train  # noqa: E402
from bnfree_jax.bench import common, train_step  # noqa: E402

INPUTS = ('imagenet', 'fashion_mnist')


def _jpeg_records(num_jpegs, seed=0):
  """A tfds-style as_dataset_fn over generated 500x375 JPEGs (ImageNet's
  typical size). Smooth random shapes plus noise compress to ~100 KB, close
  to ImageNet's average file, so decoding costs what it would on real data."""
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
  if name == 'imagenet':
    config = common.load_config('resnet18_wn')  # imagenet2012: decode, inception crop, flip.
    as_dataset_fn, mean_kb = _jpeg_records(num_jpegs)
    source = (f'{num_jpegs} generated 500x375 JPEGs (mean {mean_kb:.0f} KB) through '
              'tfds.testing.mock_data')
    context = tfds.testing.mock_data(as_dataset_fn=as_dataset_fn)
  else:
    config = common.load_config('fashion_mnist')
    source = input_pipeline.data_source(config)
    context = contextlib.nullcontext()
  config.batch_size = batch_size
  with context:
    batches = input_pipeline.train_batches(
        config, steps_per_epoch=train.setup(config).steps_per_epoch, start_step=0,
        local_batch_size=batch_size, process_index=0, process_count=1)
    for _ in range(2):
      batch = next(batches)
    count, t0, cpu_start = 0, time.perf_counter(), common.cpu_seconds()
    while time.perf_counter() - t0 < seconds:
      next(batches)
      count += 1
    elapsed = time.perf_counter() - t0
    other_cores = common.other_cores(cpu_start, common.cpu_seconds())
  return dict(input=name, dataset=config.dataset, source=source, batch_size=batch_size,
              image_shape=list(batch['image'].shape[1:]), batches=count,
              seconds=elapsed, images_per_sec=count * batch_size / elapsed,
              load_avg=os.getloadavg()[0], other_cpu_cores=other_cores)


def consumption(name, batch_size, image_size, steps_json):
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
    config = train_step.variant_config('resnet18', 'weight_clip_dropout', batch_size,
                                       image_size, 64)
    what = f'resnet18 weight_clip_dropout, batch {batch_size}, {image_size} px'
  else:
    config = common.load_config('fashion_mnist')
    config.batch_size = batch_size
    what = (f'configs/fashion_mnist.py ({config.model.name} width {config.model.width}, '
            f'{config.model.stem} stem), batch {batch_size}')
  record, = train_step.measure_steps([train_step.Run(config.model.name, name, config)],
                                     steps=3, warmup=1)
  return dict(what=what + ' (measured now)', images_per_sec=record['images_per_sec'])


def measure(names, batch_size, seconds, image_size, steps_json):
  """One row per input: the pipeline's rate, the step's, and the headroom."""
  rows = []
  for name in names:
    common.progress(f'input pipeline {name}: {seconds:.0f} s')
    row = measure_input(name, batch_size, seconds)
    used = consumption(name, batch_size, image_size, steps_json)
    row.update(consumption=used['what'], consumption_images_per_sec=used['images_per_sec'],
               **common.machine())
    row['headroom'] = headroom(row)
    rows.append(row)
  return rows


def headroom(row):
  """How many times over the pipeline feeds what the step consumes."""
  return row['images_per_sec'] / row['consumption_images_per_sec']


def input_table(rows):
  lines = ['| input | source | batch | pipeline img/s | train step consumes img/s '
           '| headroom | load avg | other cores busy |', '|---|---|---|---|---|---|---|---|']
  for r in rows:
    lines.append(
        f"| {r['input']} | {r['source']} | {r['batch_size']} | {r['images_per_sec']:.0f} | "
        f"{r['consumption_images_per_sec']:.1f} ({r['consumption']}) | "
        f"{r['headroom']:.1f}x | {r['load_avg']:.2f} | {common.cores(r['other_cpu_cores'])} |")
  return '\n'.join(lines) + '\n'
