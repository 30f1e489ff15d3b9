"""What a run logs and how: the TensorBoard tags the trainer writes and the
report reads, the event-file writer, and the duration format of progress
lines.

Events are written with tensorboardX, which needs no TensorFlow (GPU hosts
often have none); TensorBoard and bnfree_jax.report read them.
"""

import numpy as np
import tensorboardX

TRAIN, EVAL = 'train', 'eval'       # Prefixes of the metrics.TrainMetrics/EvalMetrics names.
TRAIN_EPOCH = 'train_epoch'         # metrics.EpochMetrics: averages over whole epochs.
EVAL_EMA = 'eval_ema'               # EvalMetrics of the parameters' moving average.
EPOCH = 'train/epoch'
STEPS_PER_SEC = 'steps_per_sec'
IMAGES_PER_SEC = 'perf/images_per_sec'        # Training steps only, evaluation excluded.
SECONDS_PER_EPOCH = 'perf/seconds_per_epoch'  # Likewise.
PEAK_MEMORY_GB = 'perf/peak_memory_gb'
EPSILON = 'train/epsilon'                    # DP-SGD: privacy spent so far, at dp.delta.
NOISE_MULTIPLIER = 'train/noise_multiplier'  # DP-SGD: sigma.
EVAL_SECONDS = 'perf/eval_seconds'
LAYER_GRAD_NORM = 'grad_norm'           # grad_norm/<layer>
GRAD_HISTOGRAM = 'grad_log10_magnitude'  # grad_log10_magnitude/<stage>
HISTOGRAM_BINS = 30  # As tf.summary.histogram's default.


def tag(prefix: str, name: str) -> str:
  return f'{prefix}/{name}'


def format_duration(seconds: float) -> str:
  seconds = int(seconds)
  return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s'


class Writer:
  """Scalars and histograms into WORKDIR's event files (a background thread
  writes them); a no-op on processes other than 0, so that a multi-process
  run writes one set of files."""

  def __init__(self, workdir: str, enabled: bool = True):
    self._writer = tensorboardX.SummaryWriter(workdir) if enabled else None

  def write_scalars(self, step: int, scalars: dict):
    if self._writer:
      for name, value in scalars.items():
        self._writer.add_scalar(name, float(value), step)

  def write_histograms(self, step: int, arrays: dict):
    if self._writer:
      for name, values in arrays.items():
        self._writer.add_histogram(name, np.asarray(values), step, bins=HISTOGRAM_BINS)

  def flush(self):
    if self._writer:
      self._writer.flush()

  def close(self):
    if self._writer:
      self._writer.close()
