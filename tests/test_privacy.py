"""Privacy on the host: Poisson sampling as the accountant assumes it, the
micro-batches that carry it, and epsilon against dp_accounting and against an
independent Renyi-DP computation."""

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld, rdp

from bnfree_jax import input_pipeline, privacy


def test_poisson_batch_sizes_follow_the_binomial():
  n, q, steps = 1000, 0.05, 4000
  sizes = np.array([len(privacy.sample(0, t, n, q)) for t in range(steps)])
  mean, var = n * q, n * q * (1 - q)
  # The sample mean has sd sqrt(var / steps), the sample variance about
  # var * sqrt(2 / steps): 5 sd each is a bound that a correct sampler
  # misses about once in 3 million.
  assert abs(sizes.mean() - mean) < 5 * math.sqrt(var / steps)
  assert abs(sizes.var(ddof=1) - var) < 5 * var * math.sqrt(2 / steps)
  # Every example alike: its count over the steps is Binomial(steps, q).
  counts = np.bincount(np.concatenate([privacy.sample(0, t, n, q) for t in range(steps)]),
                       minlength=n)
  assert abs(counts.mean() - steps * q) < 5 * math.sqrt(steps * q * (1 - q) / n)
  assert counts.min() > 0


def test_sampling_is_a_function_of_seed_and_step():
  a = privacy.sample(3, 17, 500, 0.1)
  np.testing.assert_array_equal(a, privacy.sample(3, 17, 500, 0.1))
  assert not np.array_equal(a, privacy.sample(3, 18, 500, 0.1))
  assert not np.array_equal(a, privacy.sample(4, 17, 500, 0.1))
  assert np.all(np.diff(a) > 0)  # A set: each example at most once per step.


def test_shuffle_steps_are_the_epochs_permutation():
  steps = [privacy.step_indices('shuffle', 0, t, 100, 30) for t in range(6)]
  assert all(len(s) == 30 for s in steps)
  np.testing.assert_array_equal(np.concatenate(steps[:3]),
                                input_pipeline.permutation(0, 0, 100)[:90])
  np.testing.assert_array_equal(steps[3], input_pipeline.permutation(0, 1, 100)[:30])


@pytest.mark.parametrize('count', [0, 1, 7, 8, 9, 20])
def test_microbatches_carry_every_sampled_example_once(count):
  indices = np.arange(100, 100 + count)
  whole = list(privacy.microbatches(indices, 8))
  assert len(whole) == max(1, -(-count // 8))
  rows = np.concatenate([r for r, _ in whole])
  mask = np.concatenate([m for _, m in whole])
  np.testing.assert_array_equal(rows[mask], indices)
  assert mask.sum() == count and not mask[count:].any()
  # Two processes: each takes half of every micro-batch, and the halves
  # interleave back into the single-process stream.
  halves = [list(privacy.microbatches(indices, 8, process_index=p, process_count=2))
            for p in range(2)]
  for (r, m), (r0, m0), (r1, m1) in zip(whole, *halves):
    np.testing.assert_array_equal(r, np.concatenate([r0, r1]))
    np.testing.assert_array_equal(m, np.concatenate([m0, m1]))


def test_epsilon_is_dp_accountings():
  """The anchors' values (dp-accounting 0.6.0): q = 256/60000, sigma = 1.1,
  60 epochs, delta = 1e-5: PLD 2.382, RDP 2.597."""
  q, sigma, steps, delta = 256 / 60000, 1.1, 14_062, 1e-5
  assert privacy.epsilon(q, sigma, steps, delta) == pytest.approx(2.382, abs=1e-3)
  assert privacy.epsilon(q, sigma, steps, delta, 'rdp') == pytest.approx(2.597, abs=1e-3)
  event = dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
  for name, accountant in (('pld', pld.PLDAccountant()), ('rdp', rdp.RdpAccountant())):
    accountant.compose(event)
    assert privacy.epsilon(q, sigma, steps, delta, name) == accountant.get_epsilon(delta)
  assert privacy.epsilon(q, sigma, 0, delta) == 0.0
  assert privacy.epsilon(q, 0.0, 10, delta) == math.inf


def _rdp_epsilon_by_hand(q, sigma, steps, delta, orders=range(2, 257), mean_noise=0.0):
  """Renyi DP of the Poisson-subsampled Gaussian at integer orders a
  (Mironov, Talwar & Zhang 2019, sec. 3.3: the binomial expansion
  sum_k C(a, k) (1-q)^(a-k) q^k exp((k^2 - k) / (2 sigma^2))), composed over
  the steps, turned into (epsilon, delta) by Canonne, Kamath & Steinke 2020
  (Prop. 12), the conversion dp_accounting uses. Written from the papers,
  in log space, independently of dp_accounting. mean_noise > 0 adds one
  Gaussian mechanism: a / (2 mean_noise^2) at order a (Mironov 2017)."""
  best = math.inf
  for a in orders:
    terms = [math.lgamma(a + 1) - math.lgamma(k + 1) - math.lgamma(a - k + 1)
             + (a - k) * math.log1p(-q) + k * math.log(q) + (k * k - k) / (2 * sigma**2)
             for k in range(a + 1)]
    top = max(terms)
    per_step = (top + math.log(sum(math.exp(t - top) for t in terms))) / (a - 1)
    rdp = steps * per_step + (a / (2 * mean_noise**2) if mean_noise else 0.0)
    eps = rdp + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1)
    best = min(best, eps)
  return best


@pytest.mark.parametrize('q, sigma, steps', [(256 / 60000, 1.1, 14_062), (0.05, 2.0, 300),
                                             (4096 / 60000, 3.0, 1000)])
def test_epsilon_against_an_independent_computation(q, sigma, steps):
  by_hand = _rdp_epsilon_by_hand(q, sigma, steps, 1e-5)
  ours_rdp = privacy.epsilon(q, sigma, steps, 1e-5, 'rdp')
  ours_pld = privacy.epsilon(q, sigma, steps, 1e-5)
  # dp_accounting also tries fractional orders, so it may only be lower, and
  # not by much; PLD is tighter still, but of the same mechanism.
  assert by_hand * 0.97 <= ours_rdp <= by_hand + 1e-9
  assert by_hand * 0.7 <= ours_pld <= ours_rdp


def _gaussian_epsilon_by_hand(mu: float, delta: float) -> float:
  """The exact epsilon at delta of a Gaussian mechanism of sensitivity 1 and
  std 1 / mu (Balle & Wang 2018, Thm. 8: delta(eps) = Phi(-eps / mu + mu / 2)
  - e^eps Phi(-eps / mu - mu / 2)), by bisection. Gaussians compose exactly:
  k of stds sigma_i are one of 1 / mu, mu^2 = sum 1 / sigma_i^2."""
  def phi(x):
    return 0.5 * math.erfc(-x / math.sqrt(2))
  lo, hi = 0.0, 100.0
  for _ in range(200):
    mid = (lo + hi) / 2
    if phi(-mid / mu + mu / 2) - math.exp(mid) * phi(-mid / mu - mu / 2) > delta:
      lo = mid
    else:
      hi = mid
  return hi


@pytest.mark.parametrize('sigma, steps, mean_noise', [(2.0, 10, 5.0), (5.0, 50, 3.0),
                                                      (1.0, 0, 20.0)])
def test_the_released_feature_mean_composes_exactly(sigma, steps, mean_noise):
  """With q = 1 every mechanism is a plain Gaussian, whose composition has a
  closed form: the PLD epsilon of the steps and the feature mean against it."""
  mu = math.sqrt(steps / sigma**2 + 1 / mean_noise**2)
  assert privacy.epsilon(1.0, sigma, steps, 1e-5, mean_noise=mean_noise) == pytest.approx(
      _gaussian_epsilon_by_hand(mu, 1e-5), rel=1e-6)


def test_the_released_feature_mean_costs_what_rdp_by_hand_says():
  q, sigma, steps, sm = 0.05, 2.0, 300, 10.0
  by_hand = _rdp_epsilon_by_hand(q, sigma, steps, 1e-5, mean_noise=sm)
  assert by_hand * 0.97 <= privacy.epsilon(q, sigma, steps, 1e-5, 'rdp', sm) <= by_hand + 1e-9
  assert privacy.epsilon(q, sigma, steps, 1e-5, mean_noise=sm) > privacy.epsilon(
      q, sigma, steps, 1e-5)


def test_calibrated_noise_gives_at_most_the_target_epsilon():
  q, steps, delta = 0.05, 500, 1e-5
  for target in (1.0, 3.0):
    sigma = privacy.calibrate_noise(target, delta, q, steps)
    assert privacy.epsilon(q, sigma, steps, delta) <= target
    assert privacy.epsilon(q, 0.99 * sigma, steps, delta) > target  # And not much more noise.
    # With a released feature mean, a little more noise for the same target.
    with_mean = privacy.calibrate_noise(target, delta, q, steps, mean_noise=10.0)
    assert sigma < with_mean and privacy.epsilon(q, with_mean, steps, delta,
                                                 mean_noise=10.0) <= target
