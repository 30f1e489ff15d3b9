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


def test_gradient_summaries_group_by_layer_and_stage():
  grads = {'stem_conv': {'v': jnp.full((3, 3, 1, 2), 2.0), 'g': jnp.ones(2)},
           'stage1_block0': {'conv1': {'v': jnp.full((2, 2), 1e-3)}},
           'head': {'kernel': jnp.zeros((4, 3)), 'bias': jnp.full(3, 4.0)}}
  norms = metrics.layer_grad_norms(grads)
  assert set(norms) == {'stem_conv', 'stage1_block0/conv1', 'head'}
  assert float(norms['stem_conv']) == pytest.approx(np.sqrt(18 * 4 + 2))
  assert float(norms['head']) == pytest.approx(np.sqrt(3 * 16))
  samples = metrics.grad_magnitude_samples(grads, per_stage=4)
  assert set(samples) == {'stem', 'stage1', 'head'}
  np.testing.assert_allclose(samples['stage1'], -3.0, rtol=1e-6)
  assert samples['stem'].size <= 20 // 4 + 1
