"""bnfree_jax.lr_find: the LR rises exponentially over the sweep, divergence
stops it, the suggestions lie inside the swept range, the smoothing is
fastai's; bad input is one line and exit code 2 before anything compiles."""

import contextlib
import io
import json

import numpy as np
import pytest

import helpers
from bnfree_jax import lr_find


def test_smoothing_is_the_debiased_moving_average():
  # beta 0.5: a = 0.5, 1.25, 2.125, each divided by 1 - 0.5^i.
  np.testing.assert_allclose(lr_find.smooth([1.0, 2.0, 3.0], beta=0.5),
                             [1.0, 1.25 / 0.75, 2.125 / 0.875])
  # Debiased, a constant loss is itself from the first step on.
  np.testing.assert_allclose(lr_find.smooth([2.3] * 5), 2.3)


def test_suggestions_skip_the_first_tenth():
  lrs = 2.0 ** np.arange(10)
  # The first point (9, the lowest before the fall) is skipped; the fall is
  # steepest from LR 4 to 8, and the loss lowest at LR 64.
  smoothed = [9, 10, 9.5, 7, 6.5, 6, 5.9, 7, 9, 12]
  assert lr_find.suggestions(lrs, smoothed) == (4.0, 64.0)
  # A steeper fall after the lowest point (9 -> 7.5 from LR 64) does not
  # count: steepest is on the way to the lowest.
  assert lr_find.suggestions(lrs, [9, 10, 9.5, 9, 8, 7, 9, 7.5, 12, 12]) == (8.0, 32.0)
  # Lowest at the second point: no fall to speak of.
  assert lr_find.suggestions(lrs, [9, 10, 8, 11, 12, 13, 14, 15, 16, 17]) == (None, None)


@pytest.fixture(scope='module')
def diverging(tmp_path_factory):
  """A sweep of the tiny recipe from LR 1e-2 towards 1e2 over 150 steps,
  which diverges on the way: (exit code, stdout, lr_find.json, out dir).
  Slow enough that the loss clearly falls first (1.40 to 0.88, smoothed):
  a faster one crosses the useful LRs in a few steps and leaves the lowest
  point to the rounding in the fourth digit."""
  root = tmp_path_factory.mktemp('lr_find')
  config, out = helpers.write_config(root / 'tiny.py'), root / 'out'
  with contextlib.redirect_stdout(io.StringIO()) as stdout:
    code = lr_find.run(['lr_find', '--config', str(config), '--out', str(out), '--steps', '150',
                        '--start_lr', '1e-2', '--end_lr', '1e2'])
  printed = stdout.getvalue().splitlines()
  return code, printed, json.loads((out / 'lr_find.json').read_text()), out


def test_the_lr_rises_exponentially_until_the_loss_diverges(diverging):
  code, printed, result, _ = diverging
  assert code == 0
  lrs = np.array(result['lr'])
  assert 20 <= len(lrs) < 150  # Stopped early ...
  # ... on the rising ramp 1e-2 * 1e4^(step / 150).
  np.testing.assert_allclose(lrs, 1e-2 * 1e4 ** (np.arange(len(lrs)) / 150), rtol=1e-5)
  assert result['diverged_at'] >= lrs[-1]
  smoothed = np.array(result['smoothed'])
  np.testing.assert_allclose(smoothed, lr_find.smooth(result['loss']))
  # Stopped at the first step whose smoothed loss exceeds 4x the lowest so far.
  below = [s <= lr_find.DIVERGED * smoothed[:i + 1].min() for i, s in enumerate(smoothed)]
  assert all(below[:-1]) and not below[-1]
  assert result['diverged_at'] == lrs[-1]
  assert f'diverged at LR {result["diverged_at"]:.3g}' in printed[0]


def test_suggestions_lie_inside_the_swept_range(diverging):
  _, printed, result, out = diverging
  steepest, largest = result['steepest'], result['largest']
  lrs = result['lr']
  assert lrs[0] <= steepest <= largest <= lrs[-1]
  assert (steepest, largest) == lr_find.suggestions(lrs, result['smoothed'])
  assert printed[1] == (f'suggestion: steepest descent at LR {steepest:.3g}; lowest loss at LR '
                        f'{largest:.3g}, the largest before divergence')
  png = (out / 'lr_find.png').read_bytes()
  assert png[:8] == b'\x89PNG\r\n\x1a\n' and len(png) > 10_000


@pytest.mark.parametrize('args,message', [
    (['--steps', '5'], '--steps=5 must be >= 10'),
    (['--start_lr', '1', '--end_lr', '0.1'], '--start_lr=1 and --end_lr=0.1 must be 0 < start < end'),
    (['--start_lr', '0'], '--start_lr=0 and --end_lr=10 must be 0 < start < end'),
    (['--steps', 'many'], '--steps'),
    (['--config.bach_size=8'], "unknown config key 'bach_size'"),
    (['--config.batch_size=6'], 'batch_size=6 is not divisible by the 4 devices'),
    (None, '--config is required'),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
  config = ['--config', str(helpers.write_config(tmp_path / 'tiny.py'))] if args else []
  assert lr_find.run(['lr_find', '--out', str(tmp_path / 'out'), *config, *(args or [])]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: ') and message in err[0], err
  assert not (tmp_path / 'out').exists()


def test_out_must_be_a_directory(tmp_path, capsys):
  (tmp_path / 'file').write_text('')
  config = helpers.write_config(tmp_path / 'tiny.py')
  assert lr_find.run(['lr_find', '--config', str(config), '--out', str(tmp_path / 'file')]) == 2
  assert capsys.readouterr().err == f'error: --out={tmp_path / "file"} is a file, not a directory\n'
