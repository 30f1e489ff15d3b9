"""What the trainer measures: CLU metric collections for train and eval, and
gradient summaries (per-layer norms, per-stage magnitude samples; paper Fig. 3).
"""

import flax
import jax
import jax.numpy as jnp
import optax
from clu import metrics


def _correct_topk(logits, labels, k):
  topk = jax.lax.top_k(logits, k)[1]
  return jnp.any(topk == labels[:, None], axis=-1).astype(jnp.float32)


def per_example(logits, labels, label_smoothing: float = 0.0):
  """Cross-entropy (against labels smoothed by label_smoothing), top-1 and
  top-5 correctness for each example."""
  logits = logits.astype(jnp.float32)
  k = min(5, logits.shape[-1])
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
  return dict(
      loss=optax.softmax_cross_entropy(logits, targets),
      top1=_correct_topk(logits, labels, 1),
      top5=_correct_topk(logits, labels, k),
  )


def _applied_average(name):
  """Average of output `name` over the steps whose update was applied (output
  `finite`): with on_nonfinite='skip', a skipped step's NaN stays out of it."""

  @flax.struct.dataclass
  class AppliedAverage(metrics.Average):
    output = name

    @classmethod
    def from_model_output(cls, **outputs):
      values = jnp.atleast_1d(outputs[name])
      return super().from_model_output(
          values, mask=jnp.broadcast_to(outputs['finite'], values.shape[:1]))

  return AppliedAverage


def with_example_totals(collection, totals: dict, count, finite):
  """collection with the averages of the outputs in `totals` ({output name:
  sum over `count` examples}) set to those totals, and to nothing where the
  step is not finite: the averages of a DP-SGD step, whose examples are
  summed micro-batch by micro-batch and whose number varies."""
  count = jnp.where(finite, count, 0)
  return collection.replace(**{
      field: metric.replace(total=jnp.where(finite, totals[metric.output], 0.0), count=count)
      for field, metric in vars(collection).items()
      if getattr(metric, 'output', None) in totals})


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
  loss: _applied_average('loss')
  top1: _applied_average('top1')
  top5: _applied_average('top5')
  grad_norm: _applied_average('grad_norm')
  clipped_fraction: _applied_average('clipped')
  learning_rate: metrics.LastValue.from_output('learning_rate')
  clip_threshold: metrics.LastValue.from_output('clip_threshold')
  param_norm: metrics.LastValue.from_output('param_norm')
  skipped_steps: metrics.LastValue.from_output('skipped_steps')


@flax.struct.dataclass
class EpochMetrics(metrics.Collection):
  """Training loss and top-1 over a whole epoch: the paper's (and PyTorch's
  ImageNet example's) "training accuracy"."""
  loss: _applied_average('loss')
  top1: _applied_average('top1')


@flax.struct.dataclass
class EvalMetrics(metrics.Collection):
  # Averages over examples whose mask is set, so the padding of the last
  # batch counts for nothing and the whole split counts exactly once.
  loss: metrics.Average.from_output('loss')
  top1: metrics.Average.from_output('top1')
  top5: metrics.Average.from_output('top5')


def _layer_and_stage(path):
  keys = [p.key for p in path]
  layer = '/'.join(keys[:-1])
  return layer, keys[0].split('_')[0]


def layer_names(tree) -> list[str]:
  """The layers ('stage1_block0/conv1', ...) of a parameter tree, as the
  gradient summaries name them."""
  return sorted({_layer_and_stage(path)[0] for path, _ in jax.tree_util.tree_leaves_with_path(tree)})


def layer_grad_norms(grads):
  """L2 norm of the gradient of each layer (all its parameters together)."""
  squares = {}
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    layer, _ = _layer_and_stage(path)
    squares[layer] = squares.get(layer, 0.0) + jnp.sum(jnp.square(g.astype(jnp.float32)))
  return {layer: jnp.sqrt(s) for layer, s in squares.items()}


def grad_magnitude_samples(grads, layer: str = '', per_group: int = 16_384):
  """log10 |g| of up to `per_group` evenly strided gradient entries per stage
  (stem, stage1..4, head) and, when given, of one layer ('stage2_block1/conv2'
  -> key 'stage2_block1.conv2'): enough for a histogram, small enough to fetch."""
  groups = {}
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    name, stage = _layer_and_stage(path)
    groups.setdefault(stage, []).append(g.reshape(-1))
    if name == layer:
      groups.setdefault(layer.replace('/', '.'), []).append(g.reshape(-1))
  samples = {}
  for group, parts in groups.items():
    flat = jnp.concatenate(parts).astype(jnp.float32)
    stride = max(1, flat.size // per_group)
    samples[group] = jnp.log10(jnp.abs(flat[::stride]) + 1e-30)
  return samples
