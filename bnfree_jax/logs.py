"""What a run logs and how: the TensorBoard tags the trainer writes and the
report reads, the event-file writer, and the duration format of progress
lines.

Events are written with tensorboardX, which needs no TensorFlow (GPU hosts
often have none); TensorBoard, bnfree_jax.report and a resumed run
(read_scalars) read them.
"""

import contextlib
import os
import struct
import time

import numpy as np
from tensorboardX import event_file_writer, summary
from tensorboardX.proto import event_pb2

from bnfree_jax.workdir import WriteError

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
  """Scalars and histograms into an event file of WORKDIR, on disk (flushed
  and fsynced) when each call returns, so the log holds every point logged
  before any checkpoint the run commits, whatever kills it; a no-op on
  processes other than 0, so that a multi-process run writes one set of files.

  Not tensorboardX's SummaryWriter: it queues events for a thread that
  flushes every 120 s, and its flush() skips the queue, so a SIGKILL lost the
  points of the last two minutes, also those behind a committed checkpoint,
  and the rerun, resuming from it, never logged them again. An fsync per
  call is a few per log interval.
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self._workdir = workdir
    self._events = (event_file_writer.EventsWriter(os.path.join(workdir, 'events'))
                    if enabled else None)

  def _write(self, step: int, values: list):
    if self._events:
      with self._writing():
        self._events.write_event(event_pb2.Event(
            step=step, wall_time=time.time(), summary=summary.Summary(value=values)))
        self._events.flush()

  def write_scalars(self, step: int, scalars: dict):
    self._write(step, [summary.Summary.Value(tag=name, simple_value=float(value))
                       for name, value in scalars.items()])

  def write_histograms(self, step: int, arrays: dict):
    self._write(step, [v for name, values in arrays.items() for v in summary.histogram(
        name, np.asarray(values), HISTOGRAM_BINS).value])

  def close(self):
    if self._events:
      with self._writing():
        self._events.close()

  @contextlib.contextmanager
  def _writing(self):
    try:
      yield
    except OSError as e:
      raise WriteError(f'cannot write the event log in {self._workdir}: {e}') from e


def keep_last_run(points):
  """(step, value) points of one tag in the order written. A resumed run logs
  again from its checkpoint step, so a step at or below the last one seen
  drops the stale points after it: EventAccumulator only purges on TF1
  restart markers, which newer writers never emit."""
  kept = []
  for step, value in points:
    while kept and kept[-1][0] >= step:
      kept.pop()
    kept.append((step, value))
  return kept


def read_scalars(workdir: str, tag: str) -> list:
  """[(step, value)] of one scalar tag in WORKDIR's event files, in step
  order, the points of the attempt that last logged each step (keep_last_run)."""
  points = []
  for name in sorted(os.listdir(workdir)):  # Named by creation time, to the second.
    if name.startswith('events.out.tfevents.'):
      points += [(event.step, v.simple_value) for event in _events(os.path.join(workdir, name))
                 for v in event.summary.value if v.tag == tag]
  return keep_last_run(points)


def _events(path):
  """The Event protos of an event file: TFRecords of (length: u64, its CRC:
  u32, data, its CRC: u32). Read here, not with TensorBoard's loader, which
  imports TensorFlow where installed (seconds a resume need not pay). The
  writer only appends, so the one damage a killed run leaves is a truncated
  last record, which is left out; the CRCs are not checked."""
  with open(path, 'rb') as f:
    data = f.read()
  start = 0
  while start + 12 <= len(data):
    (length,) = struct.unpack('<Q', data[start:start + 8])
    end = start + 12 + length
    if end + 4 > len(data):
      break
    yield event_pb2.Event.FromString(data[start + 12:end])
    start = end + 4
