"""Preprocessing values as the papers' pipelines have them: ImageNet's
evaluation crop (the central 87.5% of the shorter side, 224 of 256), CIFAR's
pad-4 crop and flip, and the per-channel normalization constants of each
dataset, written out here independently of datasets.SPECS."""

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from bnfree_jax import datasets, input_pipeline, input_tfds

# Mean and standard deviation per channel on a 0..1 scale.
CONSTANTS = {
    'imagenet2012': ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # torchvision's
    'cifar10': ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    'cifar100': ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    'mnist': ((0.1307,), (0.3081,)),
    'fashion_mnist': ((0.2860,), (0.3530,)),
}


def _config(dataset, image_size=-1):
  return ml_collections.ConfigDict(dict(
      dataset=dataset, image_size=image_size, data_dir='', seed=0,
      synthetic=dict(image_size=8, channels=3, num_classes=4, num_train=16, num_eval=8)))


def _normalized(dataset, pixels):
  mean, std = CONSTANTS[dataset]
  return (np.asarray(pixels, np.float64) / 255 - mean) / std


def _jpeg(image):
  return tf.io.encode_jpeg(image, quality=100, chroma_downsampling=False)


@pytest.mark.parametrize('dataset', CONSTANTS)
def test_normalization_constants(dataset):
  channels, size = len(CONSTANTS[dataset][0]), datasets.image_size(_config(dataset))
  pixels = np.random.default_rng(0).integers(0, 256, (2, size, size, channels), np.uint8)
  np.testing.assert_allclose(input_pipeline._normalize(_config(dataset), pixels),
                             _normalized(dataset, pixels), rtol=1e-5, atol=1e-5)
  if dataset != 'imagenet2012':  # Its records are JPEGs: next test.
    out = input_tfds._preprocess_fn(_config(dataset), train=False)(
        {'image': tf.constant(pixels[0]), 'label': tf.constant(1)}, None)
    np.testing.assert_allclose(out['image'], _normalized(dataset, pixels[0]), rtol=1e-5,
                               atol=1e-5)
    assert out['label'].dtype == tf.int32


def test_imagenet_eval_takes_the_central_87_5_percent_of_the_shorter_side():
  """A 256x384 JPEG whose central 224x224 square is a frame of colour B,
  16 px wide, around colour A, on black: the eval crop is exactly that square
  (side 0.875 * 256, centred), so the frame comes out 16 px wide all round
  and no black. Edges fall on JPEG block boundaries, so they stay sharp."""
  a, b = np.array([200, 100, 50]), np.array([30, 160, 220])
  image = np.zeros((256, 384, 3), np.uint8)
  image[16:240, 80:304] = b
  image[32:224, 96:288] = a
  out = input_tfds._preprocess_fn(_config('imagenet2012'), train=False)(
      {'image': _jpeg(image), 'label': tf.constant(7)}, None)
  got = out['image'].numpy()
  assert got.shape == (224, 224, 3) and int(out['label']) == 7
  want = np.broadcast_to(_normalized('imagenet2012', b), (224, 224, 3)).copy()
  want[16:208, 16:208] = _normalized('imagenet2012', a)
  # JPEG rounding: a level or two of 255, over std ~0.225.
  np.testing.assert_allclose(got, want, atol=3 / 255 / 0.224)


def test_imagenet_eval_crop_is_resized_to_image_size():
  image = np.zeros((256, 256, 3), np.uint8)
  image[16:240, 16:240] = 255  # The crop: all white, resized to 64 px.
  out = input_tfds._preprocess_fn(_config('imagenet2012', image_size=64), train=False)(
      {'image': _jpeg(image), 'label': tf.constant(0)}, None)
  assert out['image'].shape == (64, 64, 3)
  np.testing.assert_allclose(out['image'], np.broadcast_to(
      _normalized('imagenet2012', [255, 255, 255]), (64, 64, 3)), atol=3 / 255 / 0.224)


def test_imagenet_train_crop_is_normalized_and_seeded():
  image = np.full((96, 128, 3), (120, 60, 240), np.uint8)
  fn = input_tfds._preprocess_fn(_config('imagenet2012', image_size=32), train=True)
  record = {'image': _jpeg(image), 'label': tf.constant(0)}
  out = fn(record, tf.constant([1, 2], tf.int64))['image'].numpy()
  assert out.shape == (32, 32, 3)
  np.testing.assert_allclose(out, np.broadcast_to(
      _normalized('imagenet2012', (120, 60, 240)), out.shape), atol=3 / 255 / 0.224)
  # The random crop and flip are a function of the seed.
  varied = np.zeros((96, 128, 3), np.uint8)
  varied[:, :64] = 255
  varied[:48] += 100
  record = {'image': _jpeg(varied), 'label': tf.constant(0)}
  crops = [fn(record, tf.constant([1, s], tf.int64))['image'].numpy() for s in (2, 2, 3, 4)]
  np.testing.assert_array_equal(crops[0], crops[1])
  assert not all(np.array_equal(crops[0], c) for c in crops[2:])


def test_cifar_train_is_a_pad_4_crop_maybe_flipped():
  """Every augmented image is a 32x32 window of the image padded by 4 zeros
  each side, mirrored or not, normalized; the windows vary with the seed."""
  image = np.random.default_rng(1).integers(0, 256, (32, 32, 3), np.uint8)
  padded = _normalized('cifar10', np.pad(image, ((4, 4), (4, 4), (0, 0))))
  fn = input_tfds._preprocess_fn(_config('cifar10'), train=True)
  seen = set()
  for seed in range(12):
    out = fn({'image': tf.constant(image), 'label': tf.constant(3)},
             tf.constant([0, seed], tf.int64))['image'].numpy()
    matches = [(dy, dx, flip) for dy in range(9) for dx in range(9) for flip in (False, True)
               if np.allclose(out, (lambda w: w[:, ::-1] if flip else w)(
                   padded[dy:dy + 32, dx:dx + 32]), atol=1e-4)]
    assert len(matches) == 1, (seed, matches)
    seen.add(matches[0])
  assert len(seen) > 6 and {flip for _, _, flip in seen} == {False, True}
