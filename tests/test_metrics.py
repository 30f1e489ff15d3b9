"""Metric values against direct computations."""

import jax.numpy as jnp
import numpy as np
import pytest

from bnfree_jax import metrics


def test_per_example_loss_and_topk():
  logits = jnp.array([[3.0, 1.0, 0.0, -1.0, -2.0, -3.0],
                      [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]])
  labels = jnp.array([0, 0])
  got = metrics.per_example(logits, labels)
  want_loss = [float(jnp.log(jnp.sum(jnp.exp(row))) - row[0]) for row in logits]
  np.testing.assert_allclose(got['loss'], want_loss, rtol=1e-6)
  np.testing.assert_array_equal(got['top1'], [1.0, 0.0])
  # Label 0 is the largest logit of row 0 and the 6th of row 1.
  np.testing.assert_array_equal(got['top5'], [1.0, 0.0])


def test_eval_metrics_ignore_masked_rows():
  batch1 = metrics.EvalMetrics.single_from_model_output(
      loss=jnp.array([1.0, 2.0, 100.0]), top1=jnp.array([1.0, 0.0, 1.0]),
      top5=jnp.array([1.0, 1.0, 1.0]), mask=jnp.array([True, True, False]))
  batch2 = metrics.EvalMetrics.single_from_model_output(
      loss=jnp.array([3.0]), top1=jnp.array([1.0]), top5=jnp.array([0.0]),
      mask=jnp.array([True]))
  result = batch1.merge(batch2).compute()
  assert float(result['loss']) == pytest.approx(2.0)
  assert float(result['top1']) == pytest.approx(2 / 3)
  assert float(result['top5']) == pytest.approx(2 / 3)


def test_train_metrics_average_only_applied_steps():
  def step(loss, grad_norm, finite, skipped):
    return metrics.TrainMetrics.single_from_model_output(
        loss=jnp.array(loss), top1=jnp.array([1.0, 0.0]), top5=jnp.array([1.0, 1.0]),
        grad_norm=jnp.array(grad_norm), clipped=jnp.array(float(grad_norm > 5)),
        learning_rate=jnp.array(0.1), clip_threshold=jnp.array(5.0), param_norm=jnp.array(2.0),
        skipped_steps=jnp.array(skipped), finite=jnp.array(finite))
  got = step([1.0, 3.0], 2.0, True, 0).merge(step([jnp.nan, 1.0], jnp.inf, False, 1)).merge(
      step([2.0, 2.0], 8.0, True, 1)).compute()
  assert float(got['loss']) == pytest.approx(2.0)
  assert float(got['grad_norm']) == pytest.approx(5.0)
  assert float(got['clipped_fraction']) == pytest.approx(0.5)
  assert float(got['top1']) == pytest.approx(0.5)
  assert int(got['skipped_steps']) == 1


def test_gradient_summaries_group_by_layer_and_stage():
  grads = {'stem_conv': {'v': jnp.full((3, 3, 1, 2), 2.0), 'g': jnp.ones(2)},
           'stage1_block0': {'conv1': {'v': jnp.full((2, 2), 1e-3)}},
           'head': {'kernel': jnp.zeros((4, 3)), 'bias': jnp.full(3, 4.0)}}
  norms = metrics.layer_grad_norms(grads)
  assert set(norms) == {'stem_conv', 'stage1_block0/conv1', 'head'}
  assert float(norms['stem_conv']) == pytest.approx(np.sqrt(18 * 4 + 2))
  assert float(norms['head']) == pytest.approx(np.sqrt(3 * 16))
  samples = metrics.grad_magnitude_samples(grads, per_group=4)
  assert set(samples) == {'stem', 'stage1', 'head'}
  np.testing.assert_allclose(samples['stage1'], -3.0, rtol=1e-6)
  assert samples['stem'].size <= 20 // 4 + 1
  # One layer too: all of its entries (g and v), apart from its stage's.
  samples = metrics.grad_magnitude_samples(grads, layer='stem_conv', per_group=100)
  assert set(samples) == {'stem', 'stage1', 'head', 'stem_conv'}
  np.testing.assert_allclose(np.sort(samples['stem_conv']), [0.0] * 2 + [np.log10(2)] * 18,
                             atol=1e-6)
  assert metrics.layer_names(grads) == ['head', 'stage1_block0/conv1', 'stem_conv']
