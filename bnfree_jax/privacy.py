"""Differential privacy, host side: which examples each DP-SGD step sees, and
what privacy the run has spent.

Sampling. With dp.sampling='poisson', every training example is in the batch
of step s independently with probability q = batch_size / N, drawn from a
generator seeded by (seed, s) alone: a resumed run, and every process of a
multi-process run, sees the same batches. This is the sampling the accountant
assumes. The batch size then varies; each step's examples are cut into whole
micro-batches of dp.microbatch_size rows, the last one padded with rows whose
mask is False. No sampled example is ever dropped. dp.sampling='shuffle'
(fixed-size batches of a shuffled epoch, as most code does) is offered for
comparison only: its epsilon is computed as if sampling were Poisson, which
is not a proven guarantee for it.

Accounting. Google's dp_accounting composes the Poisson-subsampled Gaussian
mechanism over the steps: the privacy loss distribution (PLD) accountant for
the reported epsilon, Renyi DP (RDP) on request. It is imported on first
use: scipy, which it loads, fails to import where torch is blocked (as the
converter's tests block it), and most runs never account.
"""

import math
from typing import Iterator

import numpy as np

from bnfree_jax.datasets import permutation

SAMPLINGS = ('poisson', 'shuffle')
ACCOUNTANTS = ('pld', 'rdp')
_SAMPLING_SEED_TAG = 0x5D9  # Keeps the batches' generator apart from the epoch orders'.


def _accountant(name: str):
  """A fresh dp_accounting accountant of ACCOUNTANTS' `name`."""
  from dp_accounting import pld, rdp
  return {'pld': pld.PLDAccountant, 'rdp': rdp.RdpAccountant}[name]()


def dp_event(q: float, noise_multiplier: float, steps: int, mean_noise: float = 0.0):
  """`steps` Poisson-subsampled (rate q) Gaussian mechanisms (std noise_multiplier
  times the sensitivity), after one Gaussian mechanism of std mean_noise times
  its sensitivity (the released feature mean) if mean_noise > 0, as a
  dp_accounting.DpEvent."""
  import dp_accounting
  events = [dp_accounting.GaussianDpEvent(mean_noise)] if mean_noise > 0 else []
  if steps > 0:
    events.append(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(noise_multiplier)),
        steps))
  return dp_accounting.ComposedDpEvent(events)


def epsilon(q: float, noise_multiplier: float, steps: int, delta: float,
            accountant: str = 'pld', mean_noise: float = 0.0) -> float:
  """The epsilon at `delta` after `steps` steps (and the feature mean released
  with mean_noise > 0); inf without noise."""
  if steps == 0 and mean_noise <= 0:
    return 0.0
  if noise_multiplier == 0 and steps > 0:
    return math.inf
  acc = _accountant(accountant)
  acc.compose(dp_event(q, noise_multiplier, steps, mean_noise))
  return acc.get_epsilon(delta)


def calibrate_noise(target_epsilon: float, delta: float, q: float, steps: int,
                    accountant: str = 'pld', mean_noise: float = 0.0) -> float:
  """The smallest noise multiplier (to dp_accounting's tolerance) whose epsilon
  after `steps` steps (with the feature mean of mean_noise > 0) is at most
  target_epsilon."""
  import dp_accounting
  mean_alone = epsilon(q, 0, 0, delta, accountant, mean_noise)
  if mean_alone >= target_epsilon:
    raise ValueError(f'the feature mean alone (noise multiplier {mean_noise}) spends epsilon '
                     f'{mean_alone:.3f} of the target {target_epsilon}: raise '
                     'dp.feature_mean_noise')
  sigma = dp_accounting.calibrate_dp_mechanism(
      lambda: _accountant(accountant), lambda s: dp_event(q, s, steps, mean_noise),
      target_epsilon, delta)
  # calibrate_dp_mechanism returns the upper end of its bracket, which meets
  # the target; checked, since a promised epsilon must hold.
  if epsilon(q, sigma, steps, delta, accountant, mean_noise) > target_epsilon:
    raise ArithmeticError(f'calibrated noise {sigma} exceeds target epsilon {target_epsilon}')
  return sigma


def sample(seed: int, step: int, num_examples: int, q: float) -> np.ndarray:
  """The indices (ascending) of the examples in Poisson-sampled step `step`."""
  rng = np.random.default_rng([seed, _SAMPLING_SEED_TAG, step])
  return np.flatnonzero(rng.random(num_examples) < q)


def step_indices(sampling: str, seed: int, step: int, num_examples: int,
                 batch_size: int) -> np.ndarray:
  """The examples of step `step`: Poisson-sampled with rate batch_size /
  num_examples, or the step's slice of its epoch's shuffled order (the
  trainer's own, datasets.permutation)."""
  if sampling == 'poisson':
    return sample(seed, step, num_examples, batch_size / num_examples)
  steps_per_epoch = num_examples // batch_size
  epoch, i = divmod(step, steps_per_epoch)
  return permutation(seed, epoch, num_examples)[i * batch_size:(i + 1) * batch_size]


def microbatches(indices: np.ndarray, microbatch_size: int, *, process_index: int = 0,
                 process_count: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(rows, mask) of this process's share of each micro-batch of `indices`:
  ceil(len / microbatch_size) micro-batches (at least one, so that a step that
  sampled nothing still adds its noise), the last padded with masked rows
  (index 0, mask False). Process p takes rows [p B/P, (p+1) B/P) of each."""
  count = max(1, -(-len(indices) // microbatch_size))
  padded = np.zeros(count * microbatch_size, np.int64)
  padded[:len(indices)] = indices
  mask = np.arange(len(padded)) < len(indices)
  local = microbatch_size // process_count
  for m in range(count):
    first = m * microbatch_size + process_index * local
    yield padded[first:first + local], mask[first:first + local]
