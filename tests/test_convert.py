"""PyTorch weights in and out: torchvision's narrow ResNets (tests/fixtures,
written by make_torch_fixtures.py with torch; CI has none) give torch's
logits, round trips are bit for bit, bad state dicts name the key and shapes,
and the CLI turns a run into a file and back into a run that evaluates the same.
"""

import json
import os
import pathlib
import subprocess
import sys

import flax
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

import helpers
from bnfree_jax import convert, models, report
from conftest import REPO

FIXTURES = pathlib.Path(__file__).resolve().parent / 'fixtures'
OUTPUTS = np.load(FIXTURES / 'torch_outputs.npz')
# fixture -> (model name, norm, width), as make_torch_fixtures.py builds them.
NETS = {'resnet18_w4_bn': ('resnet18', 'batch', 4), 'resnet50_w2_bn': ('resnet50', 'batch', 2),
        'resnet18_w4_wn': ('resnet18', 'weight', 4)}
# Train-mode BN in float32 is ill-conditioned on these nets: torch's own
# train logits are up to 3e-5 (relative) from its float64 ones, and flax's
# one-pass variance E[x^2] - E[x]^2 takes the JAX logits 1e-4 from float64.
TRAIN_RTOL = 2e-4


def state_dict(fixture):
  return load_file(FIXTURES / f'torch_{fixture}.safetensors')


def model(fixture, **kwargs):
  name, norm, width = NETS[fixture]
  return models.create_model(name, num_classes=10, norm=norm, width=width, **kwargs)


def assert_close(actual, expected, rtol):
  """Within rtol of the largest |expected|: logits near 0 have no relative error."""
  np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * np.abs(expected).max())


def without_batch_counts(sd):
  return {k: v for k, v in sd.items() if not k.endswith('num_batches_tracked')}


def assert_same_tensors(a, b):
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


# -------------------------------------------------------- from_torch, to_torch ----


@pytest.mark.parametrize('fixture', NETS)
def test_from_torch_gives_torch_eval_logits(fixture):
  variables = convert.from_torch(state_dict(fixture), model(fixture))
  logits = model(fixture).apply(variables, OUTPUTS['images'], train=False)
  assert_close(logits, OUTPUTS[f'{fixture}/eval_logits'], rtol=1e-5)


@pytest.mark.parametrize('fixture', ['resnet18_w4_bn', 'resnet50_w2_bn'])
def test_from_torch_gives_torch_train_logits_and_running_stats(fixture):
  sd = state_dict(fixture)
  variables = convert.from_torch(sd, model(fixture))
  logits, updated = model(fixture).apply(variables, OUTPUTS['images'], train=True,
                                         mutable=['batch_stats'])
  assert_close(logits, OUTPUTS[f'{fixture}/train_logits'], TRAIN_RTOL)

  after = convert.to_torch({**variables, **updated}, model(fixture))
  for key in sd:
    if key.endswith('running_mean'):
      assert_close(after[key], OUTPUTS[f'{fixture}/after_train/{key}'], TRAIN_RTOL)
    elif key.endswith('running_var'):
      # torch adds the unbiased batch variance, flax the biased one: (n - 1) / n of it.
      n = OUTPUTS[f'{fixture}/count/{key.removesuffix(".running_var")}']
      new = OUTPUTS[f'{fixture}/after_train/{key}']
      assert_close(after[key], 0.9 * sd[key] + (new - 0.9 * sd[key]) * (n - 1) / n, TRAIN_RTOL)


def test_old_weight_norm_names_and_num_batches_tracked_are_optional():
  sd = state_dict('resnet18_w4_wn')
  old = {k.replace('parametrizations.weight.original0', 'weight_g')
          .replace('parametrizations.weight.original1', 'weight_v'): v for k, v in sd.items()}
  assert old.keys() != sd.keys()
  wn = model('resnet18_w4_wn')
  assert_same_tensors(convert.to_torch(convert.from_torch(old, wn), wn), sd)

  sd = state_dict('resnet18_w4_bn')
  bn = model('resnet18_w4_bn')
  assert_same_tensors(convert.to_torch(convert.from_torch(without_batch_counts(sd), bn), bn),
                      without_batch_counts(sd))


def test_unnormalized_net_takes_plain_conv_weights_and_biases():
  # The weight-norm twin with each weight computed as torch's forward does.
  wn = state_dict('resnet18_w4_wn')
  sd = {}
  for key, value in wn.items():
    if key.endswith('original1'):
      g = wn[key.replace('original1', 'original0')]
      norm = np.sqrt(np.sum(np.square(value), axis=(1, 2, 3), keepdims=True))
      sd[key.replace('parametrizations.weight.original1', 'weight')] = value * (g / norm)
    elif not key.endswith('original0'):
      sd[key] = value
  none = models.create_model('resnet18', num_classes=10, norm='none', width=4)
  logits = none.apply(convert.from_torch(sd, none), OUTPUTS['images'], train=False)
  assert_close(logits, OUTPUTS['resnet18_w4_wn/eval_logits'], rtol=1e-5)


@pytest.mark.parametrize('fixture', NETS)
def test_to_torch_of_from_torch_is_the_state_dict(fixture):
  sd = state_dict(fixture)
  assert_same_tensors(convert.to_torch(convert.from_torch(sd, model(fixture)), model(fixture)),
                      without_batch_counts(sd))


@pytest.mark.parametrize('norm', models.NORMS)
@pytest.mark.parametrize('name', ['resnet18', 'resnet50', 'resnet152'])  # 152: block 35.
def test_from_torch_of_to_torch_is_bit_for_bit(name, norm):
  net = models.create_model(name, num_classes=3, norm=norm, width=2, stem='small')
  shapes = convert._abstract_variables(net, channels=1)
  rng = np.random.default_rng(0)
  variables = flax.traverse_util.unflatten_dict(
      {k: rng.standard_normal(v.shape, np.float32) for k, v in shapes.items()})
  back = convert.from_torch(convert.to_torch(variables, net, channels=1), net, channels=1)
  assert jax.tree.structure(back) == jax.tree.structure({'batch_stats': {}, **variables})
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, back, {'batch_stats': {}, **variables})))


def test_names_are_torchvisions():
  sd = convert.to_torch(convert.from_torch(state_dict('resnet50_w2_bn'), model('resnet50_w2_bn')),
                        model('resnet50_w2_bn'))
  assert {'conv1.weight', 'bn1.running_var', 'layer1.0.downsample.0.weight',
          'layer3.5.bn3.bias', 'fc.weight'} <= sd.keys()
  assert sd['layer1.0.conv2.weight'].shape == (2, 2, 3, 3)  # OIHW
  assert sd['fc.weight'].shape == (10, 64)  # (out, in)


# ------------------------------------------------------------------- errors ----


def test_missing_key_is_named_with_its_shape():
  sd = state_dict('resnet18_w4_bn')
  del sd['layer2.0.downsample.0.weight']
  with pytest.raises(ValueError, match=r"^state dict has no 'layer2\.0\.downsample\.0\.weight'; "
                     r'the model expects shape \(8, 4, 1, 1\)$'):
    convert.from_torch(sd, model('resnet18_w4_bn'))


def test_leftover_key_is_named_with_its_shape():
  sd = state_dict('resnet18_w4_wn')
  sd['layer1.0.bn1.weight'] = np.ones(4, np.float32)
  with pytest.raises(ValueError, match=r"^state dict key 'layer1\.0\.bn1\.weight' \(shape \(4,\)\) "
                     'matches no variable of the model$'):
    convert.from_torch(sd, model('resnet18_w4_wn'))


def test_wrong_model_names_the_first_key_and_both_shapes():
  with pytest.raises(ValueError, match=r"^state dict key 'layer1\.0\.conv1\.weight' has shape "
                     r'\(4, 4, 3, 3\), the model expects \(4, 4, 1, 1\) \(and \d+ more\)$'):
    convert.from_torch(state_dict('resnet18_w4_bn'),
                       models.create_model('resnet50', num_classes=10, width=4))
  with pytest.raises(ValueError, match=r"^variable params/head/kernel has shape \(32, 10\), the "
                     r'model expects \(32, 5\) \(and 1 more\)$'):
    convert.to_torch(convert.from_torch(state_dict('resnet18_w4_bn'), model('resnet18_w4_bn')),
                     model('resnet18_w4_bn').clone(num_classes=5))


def test_model_without_a_layout_is_refused():
  with pytest.raises(ValueError, match='^no PyTorch layout for Dense; known: ResNet, NFResNet$'):
    convert.from_torch({}, flax.linen.Dense(3))


# ---------------------------------------------------------------------- CLI ----

# Runs each case as `python -m bnfree_jax.MODULE ARGV` would, in order, with
# stdout and stderr captured at the file descriptors; torch stays unimportable.
RUNNER = r'''
import json, os, sys, tempfile
sys.modules['torch'] = None
from bnfree_jax import convert, main

results = {}
for name, (module, argv) in json.load(open(sys.argv[1])).items():
  run = {'main': main.run, 'convert': convert.run}[module]
  with tempfile.TemporaryFile('w+') as out, tempfile.TemporaryFile('w+') as err:
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    os.dup2(out.fileno(), 1), os.dup2(err.fileno(), 2)
    try:
      code = run([f'bnfree_jax.{module}', *argv])
    finally:
      sys.stdout.flush(), sys.stderr.flush()
      os.dup2(saved[0], 1), os.dup2(saved[1], 2)
    out.seek(0), err.seek(0)
    results[name] = {'code': code, 'stdout': out.read(), 'stderr': err.read()}
json.dump(results, open(sys.argv[2], 'w'))
'''


def snapshot(directory):
  return {os.path.relpath(os.path.join(d, f), directory): open(os.path.join(d, f), 'rb').read()
          for d, _, files in os.walk(directory) for f in files}


def eval_scalars(workdir):
  """The last eval/* values of a run, as the report reads them."""
  return {tag: values[-1] for tag, (_, values) in report.load_run(str(workdir)).scalars.items()
          if tag.startswith('eval/')}


def restored(workdir):
  return helpers.read_checkpoint(workdir)


@pytest.fixture(scope='module')
def cli(tmp_path_factory):
  """(root, {case: {'code', 'stdout', 'stderr'}}): a 3-step run trained by
  main, exported, converted back into a new run, that one evaluated by main,
  and the bad-input cases, all in one child process."""
  root = tmp_path_factory.mktemp('convert_cli')
  # The tests' tiny run with batch norm (the converter's other norm), narrower,
  # without dropout, 3 steps.
  helpers.write_config(root / 'tiny.py', **{'model.norm': 'batch', 'model.width': 4,
                                            'model.dropout_rate': 0.0, 'num_train_steps': 3})
  (root / 'weights.bin').write_bytes(b'')
  (root / 'weights.pth').write_bytes(b'')
  config = ['--config', str(root / 'tiny.py')]
  weights = str(root / 'exported.safetensors')
  bad = {  # name: argv; none may create root/fresh.
      'unknown weights type': [str(root / 'weights.bin'), *config, '--workdir', f'{root}/fresh'],
      'pth without torch': [str(root / 'weights.pth'), *config, '--workdir', f'{root}/fresh'],
      'missing weights': [f'{root}/none.npz', *config, '--workdir', f'{root}/fresh'],
      'wrong model': [weights, *config, '--config.model.width=8', '--workdir', f'{root}/fresh'],
      'export type': ['--export', f'{root}/fresh/w.pth', *config, '--workdir', f'{root}/src'],
      'export without checkpoint': ['--export', weights, *config, '--workdir', f'{root}/fresh'],
      'export of another model': ['--export', f'{root}/w.npz', *config, '--config.model.width=8',
                                  '--workdir', f'{root}/src'],
      'export into no directory': ['--export', f'{root}/fresh/w.npz', *config, '--workdir',
                                   f'{root}/src'],
      'no workdir': [weights, *config],
      'both': [weights, '--export', weights, *config, '--workdir', f'{root}/fresh'],
      'into a run': [weights, *config, '--workdir', f'{root}/src'],
  }
  cases = {
      'train': ('main', [*config, '--workdir', f'{root}/src']),
      'export': ('convert', ['--export', weights, *config, '--workdir', f'{root}/src']),
      'import': ('convert', [weights, *config, '--workdir', f'{root}/dst']),
      'eval': ('main', [*config, '--config.eval_only=True', '--workdir', f'{root}/dst']),
      'help': ('convert', ['--help']),
      **{name: ('convert', argv) for name, argv in bad.items()},
  }
  (root / 'cases.json').write_text(json.dumps(cases))
  proc = subprocess.run([sys.executable, '-c', RUNNER, root / 'cases.json', root / 'results.json'],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  return root, json.loads((root / 'results.json').read_text())


def test_cli_round_trip_evaluates_as_the_source_run(cli):
  root, results = cli
  for name in ('train', 'export', 'import', 'eval'):
    assert results[name]['code'] == 0, (name, results[name])
  src_step, src = restored(root / 'src')
  dst_step, dst = restored(root / 'dst')
  assert (src_step, dst_step) == (3, 0)
  assert jax.tree.all(jax.tree.map(np.array_equal, (src['params'], src['batch_stats']),
                                   (dst['params'], dst['batch_stats'])))
  evaluated = eval_scalars(root / 'dst')
  assert {'eval/loss', 'eval/top1'} <= evaluated.keys()
  assert evaluated == eval_scalars(root / 'src')
  assert json.loads((root / 'dst' / 'config.json').read_text())['model']['width'] == 4


def test_cli_bad_input_is_one_line_and_exit_2_touching_no_workdir(cli):
  root, results = cli
  named = {
      'unknown weights type': "weights.bin: unknown file type '.bin'; allowed: .safetensors, "
                              '.npz, .pth, .pt',
      'pth without torch': 'needs PyTorch: pip install torch, or save the state dict as '
                           '.safetensors',
      'missing weights': f'weights file {root}/none.npz does not exist',
      'wrong model': "state dict key 'conv1.weight' has shape (4, 3, 3, 3), the model expects "
                     '(8, 3, 3, 3)',
      'export type': "w.pth: unknown file type '.pth'; allowed: .safetensors, .npz",
      'export without checkpoint': f'workdir {root}/fresh has no checkpoint to export',
      'export of another model': f'workdir {root}/src holds a run with model.width=4, not 8',
      'export into no directory': f'directory {root}/fresh does not exist',
      'no workdir': '--config and --workdir are both required',
      'both': 'give one WEIGHTS file to convert, or --export OUT and none; got 1',
      'into a run': f'workdir {root}/src already holds checkpoints',
  }
  for name, expected in named.items():
    lines = results[name]['stderr'].splitlines()
    assert results[name]['code'] == 2, (name, results[name])
    assert len(lines) == 1 and lines[0].startswith('error: '), (name, results[name])
    assert expected in lines[0], (name, results[name])
  assert not (root / 'fresh').exists() and not (root / 'w.npz').exists()
  assert sorted(os.listdir(root / 'src' / 'checkpoints')) == ['3']


def test_cli_help_prints_usage(cli):
  _, results = cli
  assert results['help']['code'] == 0
  assert 'python -m bnfree_jax.convert WEIGHTS --config' in results['help']['stdout']
  assert '--export' in results['help']['stdout']
