"""What both halves of the input pipeline (input_pipeline, input_tfds) read:
each dataset's fixed facts and the seeded epoch order. Neither half imports
the other for these, so input_pipeline imports input_tfds, never the reverse.
"""

import numpy as np

DATASETS = ('imagenet2012', 'cifar10', 'cifar100', 'mnist', 'fashion_mnist',
            'synthetic')

# name: (num_classes, native image side, per-channel mean, std on a 0..1 scale).
# synthetic takes its classes and side from config.synthetic; its mean and std
# follow from how input_pipeline._synthetic draws pixels.
SPECS = {
    'imagenet2012': (1000, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    'cifar10': (10, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    'cifar100': (100, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    'mnist': (10, 28, (0.1307,), (0.3081,)),
    'fashion_mnist': (10, 28, (0.2860,), (0.3530,)),
    'synthetic': (None, None, (0.5,), (0.24,)),
}
AUGMENTED = ('cifar10', 'cifar100')  # Pad-crop-flip in training.


def image_size(config) -> int:
  return native_size(config) if config.image_size == -1 else config.image_size


def native_size(config) -> int:
  return (config.synthetic.image_size if config.dataset == 'synthetic'
          else SPECS[config.dataset][1])


def normalization(name):
  """(mean, std) per channel on the 0..255 scale of stored pixels, float32:
  numpy and tf.data normalize with these same bits."""
  _, _, mean, std = SPECS[name]
  return 255 * np.array(mean, np.float32), 255 * np.array(std, np.float32)


def permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """The order in which epoch `epoch` reads an in-memory training split."""
  return np.random.default_rng(epoch_keys(seed, epoch)[0]).permutation(
      num_examples)


def epoch_keys(seed, epoch):
  """(order key, augmentation key) of one epoch, both uint32."""
  return np.random.SeedSequence([seed, epoch]).generate_state(2)
