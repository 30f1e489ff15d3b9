"""Tests of bnfree_jax.input_pipeline: values, determinism, offline errors."""

import itertools
import os

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from bnfree_jax import datasets
from bnfree_jax import input_pipeline as ip
from bnfree_jax import input_tfds

DEBIAN_FASHION = '/usr/share/datasets/fashion-mnist'


def _config(**overrides):
  config = ml_collections.ConfigDict(dict(
      dataset='synthetic', data_dir='', image_size=-1, shuffle_buffer=64,
      train_subset=-1, seed=0, synthetic=dict(image_size=8, channels=3, num_classes=4,
                             num_train=100, num_eval=10)))
  config.update(overrides)
  return config


def _train(config, n, start_step=0, local_batch_size=8, process_index=0,
           process_count=1):
  steps_per_epoch = ip.dataset_info(config).num_train // (local_batch_size * process_count)
  it = ip.train_batches(config, steps_per_epoch=steps_per_epoch, start_step=start_step,
                        local_batch_size=local_batch_size,
                        process_index=process_index,
                        process_count=process_count)
  return list(itertools.islice(it, n))


def _eval(config, local_batch_size, process_index=0, process_count=1):
  return list(ip.eval_batches(config, local_batch_size=local_batch_size,
                              process_index=process_index,
                              process_count=process_count))


def _assert_same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _assert_split_equals_whole(config, whole, local_batch_size, make):
  """Concatenating the per-process batches gives the 1-process batches."""
  parts = [make(config, local_batch_size=local_batch_size, process_index=i,
                process_count=2) for i in range(2)]
  assert len(parts[0]) == len(parts[1]) == len(whole)
  for w, p0, p1 in zip(whole, *parts):
    _assert_same(w, {k: np.concatenate([p0[k], p1[k]]) for k in w})


def test_load_idx_reads_debian_fashion_mnist():
  train_x, train_y, test_x, test_y = ip.load_idx(DEBIAN_FASHION)
  assert train_x.shape == (60000, 28, 28, 1) and train_x.dtype == np.uint8
  assert test_x.shape == (10000, 28, 28, 1) and test_y.shape == (10000,)
  np.testing.assert_array_equal(np.bincount(train_y), [6000] * 10)
  np.testing.assert_array_equal(np.bincount(test_y), [1000] * 10)


def test_fashion_mnist_falls_back_to_idx_and_follows_the_permutation(tmp_path):
  config = _config(dataset='fashion_mnist', data_dir=str(tmp_path), seed=3)
  info = ip.dataset_info(config)
  assert info == ip.DatasetInfo('fashion_mnist', 10, (28, 28, 1), 60000, 10000)
  train_x, train_y, _, _ = ip.load_idx(DEBIAN_FASHION)
  order = datasets.permutation(3, 0, 60000)

  batches = _train(config, 2, local_batch_size=256)
  for step, batch in enumerate(batches):
    assert batch['image'].shape == (256, 28, 28, 1)
    assert batch['image'].dtype == np.float32 and batch['label'].dtype == np.int32
    rows = order[step * 256:(step + 1) * 256]
    np.testing.assert_array_equal(batch['label'], train_y[rows])
    raw = batch['image'] * (0.3530 * 255) + 0.2860 * 255
    np.testing.assert_allclose(raw, train_x[rows], atol=1e-3)
  image = batches[0]['image']
  assert abs(image.mean()) < 0.2 and 0.8 < image.std() < 1.2


def test_fashion_mnist_eval_covers_the_test_split_once_over_3_processes(
    tmp_path):
  config = _config(dataset='fashion_mnist', data_dir=str(tmp_path))
  _, _, test_x, test_y = ip.load_idx(DEBIAN_FASHION)
  parts = [_eval(config, 1024, i, 3) for i in range(3)]
  assert [len(p) for p in parts] == [4, 4, 4]  # ceil(10000 / 3072).
  steps = [{k: np.concatenate([p[s][k] for p in parts]) for k in parts[0][s]}
           for s in range(4)]
  mask = np.concatenate([s['mask'] for s in steps])
  labels = np.concatenate([s['label'] for s in steps])
  images = np.concatenate([s['image'] for s in steps])
  assert mask.sum() == 10000 and mask[:10000].all()
  np.testing.assert_array_equal(labels[mask], test_y)
  np.testing.assert_allclose(images[mask] * (0.3530 * 255) + 0.2860 * 255,
                             test_x, atol=1e-3)
  assert not images[~mask].any() and not labels[~mask].any()


def test_eval_pads_the_last_batch_and_masks_it():
  config = _config()  # num_eval=10.
  whole = _eval(config, 16)
  assert len(whole) == 1 and whole[0]['mask'].sum() == 10
  batches = _eval(config, 4)
  assert [b['mask'].tolist() for b in batches] == [[True] * 4, [True] * 4,
                                                   [True] * 2 + [False] * 2]
  assert not batches[-1]['image'][2:].any() and not batches[-1]['label'][2:].any()
  images = np.concatenate([b['image'] for b in batches])[:10]
  labels = np.concatenate([b['label'] for b in batches])[:10]
  np.testing.assert_array_equal(images, whole[0]['image'][:10])
  np.testing.assert_array_equal(labels, whole[0]['label'][:10])
  assert len(np.unique(images.reshape(10, -1), axis=0)) == 10
  _assert_split_equals_whole(config, batches, 2, _eval)


def test_resume_and_process_split_reproduce_the_stream():
  config = _config()  # 100 examples, global batch 16: 6 steps per epoch.
  fresh = _train(config, 14, local_batch_size=16)
  for k in (1, 5, 6, 7, 13):
    _assert_same(_train(config, 1, start_step=k, local_batch_size=16)[0],
                 fresh[k])
  _assert_split_equals_whole(config, fresh, 8,
                             lambda c, **kw: _train(c, 14, **kw))


def test_each_epoch_is_a_new_permutation_of_whole_batches():
  config = _config()
  epochs = [np.concatenate([b['label'] for b in _train(config, 6, 6 * e, 16)])
            for e in range(2)]
  images, labels = ip._arrays(config, train=True)
  for e, got in enumerate(epochs):
    order = datasets.permutation(0, e, 100)
    np.testing.assert_array_equal(got, labels[order[:96]])
  assert not np.array_equal(datasets.permutation(0, 0, 100), datasets.permutation(0, 1, 100))
  assert sorted(datasets.permutation(0, 1, 100)) == list(range(100))
  first_images = [_train(config, 1, 6 * e, 16)[0]['image'] for e in range(2)]
  assert not np.array_equal(*first_images)


def test_train_subset_is_the_first_examples_as_stored(tmp_path):
  config = _config(dataset='fashion_mnist', data_dir=str(tmp_path), train_subset=600)
  assert ip.dataset_info(config).num_train == 600
  train_x, train_y, _, _ = ip.load_idx(DEBIAN_FASHION)
  # 600 // 64 = 9 steps per epoch; two epochs, each a permutation of the 600.
  batches = _train(config, 18, local_batch_size=64)
  for epoch in range(2):
    rows = datasets.permutation(0, epoch, 600)[:9 * 64]
    got = batches[9 * epoch:9 * (epoch + 1)]
    np.testing.assert_array_equal(np.concatenate([b['label'] for b in got]), train_y[rows])
    raw = np.concatenate([b['image'] for b in got]) * (0.3530 * 255) + 0.2860 * 255
    np.testing.assert_allclose(raw, train_x[rows], atol=1e-3)
  for k in (4, 9, 13):
    _assert_same(_train(config, 1, start_step=k, local_batch_size=64)[0], batches[k])
  _assert_split_equals_whole(config, batches, 32, lambda c, **kw: _train(c, 18, **kw))
  assert ip.dataset_info(config).num_eval == 10000  # The test split stays whole.


def test_train_subset_of_a_tfds_copy(tmp_path):
  config = _config(dataset='cifar10', data_dir=str(tmp_path), train_subset=12)
  with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
    assert ip.dataset_info(config).num_train == 12
    stored = input_tfds.arrays(config, train=True)[1]
    labels = np.concatenate([b['label'] for b in _train(config, 3, local_batch_size=4)])
  np.testing.assert_array_equal(labels, stored[datasets.permutation(0, 0, 12)])


def test_train_subset_of_synthetic_data_and_bad_sizes(tmp_path):
  config = _config(train_subset=40)
  images, labels = ip._arrays(config, train=True)
  whole = ip._arrays(_config(), train=True)
  np.testing.assert_array_equal(images, whole[0][:40])
  np.testing.assert_array_equal(labels, whole[1][:40])
  assert ip.dataset_info(config).num_train == 40
  for n in (0, 101, -2):
    with pytest.raises(ValueError, match=rf'train_subset={n} is not -1 \(all\) or in '
                       r'1..100, the size of the synthetic training split'):
      ip.dataset_info(_config(train_subset=n))
  with pytest.raises(ValueError, match=r'train_subset=60001 .* in 1..60000'):
    ip.dataset_info(_config(dataset='fashion_mnist', data_dir=str(tmp_path),
                            train_subset=60001))
  imagenet = _config(dataset='imagenet2012', data_dir=str(tmp_path), train_subset=10)
  train = lambda c: ip.train_batches(c, steps_per_epoch=1, start_step=0, local_batch_size=8)
  for make in (ip.dataset_info, train):
    with pytest.raises(ValueError, match='train_subset=10 is for the datasets held in '
                       'memory, not imagenet2012'):
      make(imagenet)


def test_synthetic_classes_are_separable():
  config = _config()
  images, labels = ip._arrays(config, train=True)
  means = np.stack([images[labels == c].mean(0) for c in range(4)])
  eval_images, eval_labels = ip._arrays(config, train=False)
  nearest = np.argmin(
      ((eval_images[:, None].astype(float) - means) ** 2).sum((2, 3, 4)), 1)
  assert (nearest == eval_labels).mean() == 1.0


@pytest.mark.parametrize('name,image_size', [('imagenet2012', 32),
                                             ('cifar10', -1)])
def test_mock_tfds_shapes_masks_and_determinism(tmp_path, name, image_size):
  config = _config(dataset=name, image_size=image_size, data_dir=str(tmp_path))
  with tfds.testing.mock_data(num_examples=20,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    info = ip.dataset_info(config)
    assert (info.image_shape, info.num_train, info.num_eval) == ((32, 32, 3), 20, 20)
    assert info.num_classes == {'imagenet2012': 1000, 'cifar10': 10}[name]
    fresh = _train(config, 6)  # 2 steps per epoch: crosses 2 boundaries.
    for batch in fresh:
      assert batch['image'].shape == (8, 32, 32, 3)
      assert batch['image'].dtype == np.float32 and batch['label'].dtype == np.int32
      assert np.isfinite(batch['image']).all()
      assert ((0 <= batch['label']) & (batch['label'] < info.num_classes)).all()
    _assert_same(_train(config, 1, start_step=3)[0], fresh[3])
    _assert_split_equals_whole(config, fresh, 4,
                               lambda c, **kw: _train(c, 6, **kw))
    evals = _eval(config, 8)
    assert [b['mask'].sum() for b in evals] == [8, 8, 4]
    assert not evals[-1]['mask'][4:].any()
    _assert_split_equals_whole(config, evals, 4, _eval)


def _pil_bilinear(image, size):
  return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR), np.float32)


def test_imagenet_crop_is_downsized_as_pil_does():
  # Pixel noise: every source pixel differs from its neighbours, so sampling
  # a few of them (aliasing) is far from averaging all of them (PIL).
  noise = np.random.default_rng(0).integers(0, 256, (300, 260, 3), np.uint8)
  jpeg = tf.io.encode_jpeg(noise, quality=100)
  # The eval crop: the central 87.5% of the short side, 227 px, to 64 px.
  crop = tf.io.decode_jpeg(jpeg).numpy()[36:36 + 227, 16:16 + 227]
  want = _pil_bilinear(crop, 64)
  got = input_tfds._decode_crop(jpeg, 64, None).numpy()
  assert np.abs(got - want).mean() < 2
  assert np.abs(tf.image.resize(crop, (64, 64)).numpy() - want).mean() > 20


def test_resizing_in_memory_data_downsizes_as_pil_does():
  config = _config(image_size=24, synthetic=dict(image_size=64, channels=3, num_classes=4,
                                                 num_train=100, num_eval=10))
  images, _ = ip._arrays(config, train=False)
  (batch,) = _eval(config, 16)
  got = batch['image'][:10] * (0.24 * 255) + 0.5 * 255
  want = np.stack([_pil_bilinear(image, 24) for image in images])
  assert np.abs(got - want).mean() < 2
  aliased = tf.image.resize(images, (24, 24)).numpy()
  assert np.abs(aliased - want).mean() > 20


def test_missing_mnist_names_every_place_looked(tmp_path):
  config = _config(dataset='mnist', data_dir=str(tmp_path))
  with pytest.raises(ip.DataNotFoundError) as e:
    ip.dataset_info(config)
  message = str(e.value)
  assert str(tmp_path) in message
  assert os.path.join(str(tmp_path), 'mnist') in message
  assert 'tfds build mnist' in message and 'train-images-idx3-ubyte.gz' in message
  with pytest.raises(ip.DataNotFoundError):
    next(ip.train_batches(config, steps_per_epoch=1, start_step=0, local_batch_size=8,
                          process_index=0, process_count=1))


def test_missing_imagenet_explains_the_manual_download(tmp_path):
  config = _config(dataset='imagenet2012', data_dir=str(tmp_path))
  with pytest.raises(ValueError, match='downloads/manual') as e:
    ip.dataset_info(config)
  assert isinstance(e.value, ip.DataNotFoundError)
  assert str(tmp_path) in str(e.value)


def test_bad_arguments():
  with pytest.raises(ValueError, match="dataset='foo' is not one of: "
                     'imagenet2012, cifar10, cifar100, mnist, fashion_mnist'):
    ip.dataset_info(_config(dataset='foo'))
  with pytest.raises(ValueError, match='local_batch_size=0'):
    ip.train_batches(_config(), steps_per_epoch=1, start_step=0, local_batch_size=0,
                     process_index=0, process_count=1)
  with pytest.raises(ValueError, match='steps_per_epoch=0 must be > 0'):
    ip.train_batches(_config(), steps_per_epoch=0, start_step=0, local_batch_size=64,
                     process_index=0, process_count=2)
  with pytest.raises(ValueError, match=r'process_index=2 is not in \[0, process_count=2\)'):
    ip.train_batches(_config(), steps_per_epoch=1, start_step=0, local_batch_size=8,
                     process_index=2, process_count=2)


def test_reads_the_default_config_layout(default_config):
  default_config.dataset = 'synthetic'
  info = ip.dataset_info(default_config)
  assert info == ip.DatasetInfo('synthetic', 10, (32, 32, 3), 1024, 256)
  batch = _train(default_config, 1, local_batch_size=32)[0]
  assert batch['image'].shape == (32, 32, 32, 3)
  assert sum(b['mask'].sum() for b in _eval(default_config, 100)) == 256
