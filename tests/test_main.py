"""The CLI turns bad input into one line on stderr and exit code 2, before
anything compiles and without touching the workdir; the trainer's other
outcomes map to the documented exit codes.

All cases run in one child process (one import of JAX and TF, ~8 s), each a
separate main.run(argv) with its stderr captured at the file descriptor, so
anything TF, absl or JAX would print there counts too.
"""

import json
import logging
import os
import re
import socket
import subprocess
import sys

import pytest

import helpers
from bnfree_jax import workdir as workdirs
from conftest import REPO

# Runs each case as `python -m bnfree_jax.main ARGV` would; a case with
# 'raises' replaces the training by that trainer exception. In case
# 'SIGTERM', the signal comes while main.py sets up, before any training.
# JAX reports every computation it lowers and compiles (or fetches from its
# compilation cache) to its monitoring listeners: each case counts those
# events. Tracing alone (jax.eval_shape) compiles nothing and is allowed.
RUNNER = r'''
import json, os, signal, sys, tempfile, time
import jax
from bnfree_jax import main, train

events = []
LOWERED = ('/jax/core/compile/jaxpr_to_mlir_module_duration',
           '/jax/core/compile/backend_compile_duration')
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: events.append(event) if event in LOWERED else None)
jax.monitoring.register_event_listener(
    lambda event, **kw: events.append(event) if event.startswith('/jax/compilation_cache/')
    else None)
results, real_train, real_setup = {}, train.train_and_evaluate, train.setup
for name, case in json.load(open(sys.argv[1])).items():
  def raising(config, workdir, stop, error=case.get('raises')):
    if error == 'SIGTERM':
      raise train.Preempted(f'the trainer found {stop.received}')
    raise getattr(train, error)('the trainer says why')
  def setup_then_sigterm(config):
    real_setup(config)
    signal.raise_signal(signal.SIGTERM)
  train.train_and_evaluate = raising if case.get('raises') else real_train
  train.setup = setup_then_sigterm if case.get('raises') == 'SIGTERM' else real_setup
  start, events[:] = time.time(), []
  with tempfile.TemporaryFile('w+') as err:
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(err.fileno(), 2)
    try:
      code = main.run(['bnfree_jax.main', *case['argv']])
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
    err.seek(0)
    results[name] = {'code': code, 'stderr': err.read(), 'seconds': time.time() - start,
                     'compile_events': list(events)}
# The control: a jitted function's first call is seen.
events[:] = []
jax.jit(lambda x: x * 2)(1.0)
results['control'] = {'compile_events': list(events)}
json.dump(results, open(sys.argv[2], 'w'))
'''


def snapshot(directory):
  """Every file under directory with its content."""
  return {os.path.relpath(os.path.join(d, f), directory): open(os.path.join(d, f), 'rb').read()
          for d, _, files in os.walk(directory) for f in files}


def existing_run(workdir, width):
  """A workdir as an earlier run leaves it: config.json and a checkpoint."""
  (workdir / 'checkpoints' / '8').mkdir(parents=True)
  (workdir / 'checkpoints' / '8' / '_CHECKPOINT_METADATA').write_text('{}')
  (workdir / 'config.json').write_text(json.dumps({
      'dataset': 'synthetic', 'lr_schedule': {'base_lr': 0.1},
      'model': {'name': helpers.tiny_config().model.name, 'norm': 'weight', 'width': width,
                'stem': 'small'}}))
  return workdir


@pytest.fixture(scope='module')
def cli(tmp_path_factory):
  """(root, {bad input: (what its error line must name, result)}, {trainer
  error: result}), every case run once, all in one child process. No case
  may create a workdir under root/fresh."""
  root = tmp_path_factory.mktemp('cli')
  config = helpers.write_config(root / 'tiny.py')
  (root / 'broken.py').write_text('def get_config(:\n')
  helpers.write_config(root / 'badtype.py', "c.batch_size = '16'")
  typo = helpers.write_config(root / 'typo.py', "c.model.update(nmae='resnet18')")
  typo_line = typo.read_text().splitlines().index("  c.model.update(nmae='resnet18')") + 1
  (root / 'empty_data_dir').mkdir()
  (root / 'a_file').write_text('')
  existing_run(root / 'other_model', width=16)
  existing_run(root / 'same_model', width=8)
  existing_run(root / 'broken_run', width=8)
  (root / 'broken_run' / 'config.json').write_text('{"dataset": ')

  def argv(name, *overrides, config=config, workdir=None):
    return ['--config', str(config), '--workdir', str(workdir or root / 'fresh' / name),
            *overrides]

  bad_input = {  # name: (argv, what the error line must name)
      'unknown key': (argv('k', '--config.bach_size=8'), "unknown config key 'bach_size'"),
      'unknown nested key': (argv('n', '--config.model.widht=8'), "unknown config key 'widht'"),
      'wrong type': (argv('t', '--config.batch_size=abc'), '--config.batch_size=abc'),
      'float for int': (argv('f', '--config.model.width=8.5'), '--config.model.width=8.5'),
      'zero lr': (argv('z', '--config.lr_schedule.base_lr=0'),
                  'lr_schedule.base_lr=0.0 must be > 0'),
      'negative lr': (argv('l', '--config.lr_schedule.base_lr=-0.1'),
                      'lr_schedule.base_lr=-0.1 must be > 0'),
      'batch vs devices': (argv('b', '--config.batch_size=6'),
                           'batch_size=6 is not divisible by the 4 devices'),
      'dropout 1': (argv('d', '--config.model.dropout_rate=1.0'),
                    'dropout_rate=1.0 must be in [0, 1)'),
      'dropout < 0': (argv('e', '--config.model.dropout_rate=-0.1'),
                      'dropout_rate=-0.1 must be in [0, 1)'),
      'clip threshold': (argv('c', '--config.grad_clip.threshold=0'),
                         'grad_clip.threshold=0.0 must be > 0'),
      'bad choice': (argv('o', '--config.on_nonfinite=ignore'), "on_nonfinite='ignore'"),
      'bad divergence choice': (argv('dc', '--config.on_divergence=skip'),
                                "on_divergence='skip' is not one of: stop, ignore"),
      'zero divergence patience': (argv('dp', '--config.divergence.patience=0'),
                                   'divergence.patience=0 must be an integer > 0'),
      'loss factor 1': (argv('df', '--config.divergence.loss_factor=1'),
                        'divergence.loss_factor=1.0 must be > 1'),
      'missing dataset': (argv('m', '--config.dataset=cifar10',
                               f'--config.data_dir={root}/empty_data_dir'),
                          f'cifar10: no prepared tfds copy under {root}/empty_data_dir'),
      'partial distributed flags': (argv('p', '--num_processes=2'),
                                    '--coordinator_address, --num_processes and --process_id'),
      'missing config file': (argv('x', config=root / 'missing.py'), 'missing.py'),
      'broken config file': (argv('y', config=root / 'broken.py'),
                             'invalid syntax (broken.py, line 1)'),
      'wrong type in config file': (argv('w', config=root / 'badtype.py'), "field 'batch_size'"),
      'unknown key in the config file': (argv('g', config=root / 'typo.py'),
                                         f"unknown config key 'nmae' set at {root}/typo.py:"
                                         f'{typo_line} (Did you mean "name" instead of "nmae"?)'),
      'no workdir': (['--config', str(config)], '--config and --workdir are both required'),
      'workdir under a file': (argv('u', workdir=root / 'a_file' / 'run'),
                               f'workdir {root}/a_file/run cannot be created: Not a directory'),
      'workdir is a file': (argv('i', workdir=root / 'a_file'),
                            f'workdir {root}/a_file cannot be created: File exists'),
      'eval-only without a checkpoint': (argv('v', '--config.eval_only=True'),
                                         f'workdir {root}/fresh/v has no checkpoint to evaluate'),
      'workdir of another model': (argv('a', workdir=root / 'other_model'),
                                   f'workdir {root}/other_model holds a run with model.width=16, '
                                   'not 8: use another --workdir'),
      # same_model's config.json predates train_subset: it stands for all (-1).
      'workdir of another train subset': (argv('q', '--config.train_subset=64',
                                              workdir=root / 'same_model'),
                                         f'workdir {root}/same_model holds a run with '
                                         'train_subset=-1, not 64: use another --workdir'),
      'histogram layer': (argv('hl', '--config.histogram_layer=stage9_block0/conv1'),
                          "histogram_layer='stage9_block0/conv1' is not a layer of "
                          f'{helpers.tiny_config().model.name}'),
      'linear with a norm': (argv('lin', '--config.model.name=linear'),
                             "norm='weight': the linear model takes norm='none' only"),
      'dp with batch norm': (argv('dpb', '--config.dp.enabled=True', '--config.dp.noise_multiplier=1',
                                  '--config.model.norm=batch'),
                             "dp.enabled=True with model.norm='batch': batch norm mixes the "
                             'examples of a batch'),
      'dp without noise settled': (argv('dpn', '--config.dp.enabled=True'),
                                   'set exactly one of dp.noise_multiplier'),
      'dp micro-batch vs devices': (argv('dpm', '--config.dp.enabled=True',
                                         '--config.dp.noise_multiplier=1',
                                         '--config.dp.microbatch_size=6'),
                                    'dp.microbatch_size=6 must be a positive multiple of the 4'),
      'dp with resized images': (argv('dpi', '--config.dp.enabled=True',
                                      '--config.dp.noise_multiplier=1', '--config.image_size=8'),
                                 'dp.enabled=True trains on the images as stored (16 pixels): '
                                 'image_size=8 is not supported with DP; leave it -1'),
      'feature mean of a ResNet': (argv('dpf', '--config.dp.enabled=True',
                                        '--config.dp.noise_multiplier=1',
                                        '--config.dp.feature_mean_noise=10'),
                                   "dp.feature_mean_noise=10.0 needs model.name='linear'"),
      'feature mean spending the whole budget': (
          argv('dpe', '--config.dp.enabled=True', '--config.dp.target_epsilon=0.1',
               '--config.dp.feature_mean_noise=10', '--config.model.name=linear',
               '--config.model.norm=none', '--config.model.stem=scatter',
               '--config.model.dropout_rate=0'),
          'the feature mean alone (noise multiplier 10.0) spends epsilon 0.341 of the target '
          '0.1: raise dp.feature_mean_noise'),
      'workdir with a broken config.json': (argv('j', workdir=root / 'broken_run'),
                                            f'{root}/broken_run/config.json is not valid JSON'),
      # Refused before the existing run's config.json is rewritten.
      'bad value on an existing run': (argv('s', '--config.lr_schedule.base_lr=-1',
                                            workdir=root / 'same_model'),
                                       'lr_schedule.base_lr=-1.0 must be > 0'),
  }
  if os.geteuid() != 0:  # Root may write anywhere: test_unwritable_workdir covers it then.
    (root / 'read_only').mkdir(mode=0o555)
    bad_input['read-only workdir'] = (argv('r', workdir=root / 'read_only'),
                                      f'workdir {root}/read_only is not writable')
  # This process runs on 'busy' (holds its lock) while the cases run.
  existing_run(root / 'busy', width=8)
  bad_input['workdir in use'] = (argv('h', workdir=root / 'busy'),
                                 f'workdir {root}/busy is in use by host {socket.gethostname()} '
                                 f'pid {os.getpid()} (its lock: {root}/busy/lock)')
  outcomes = {error: argv(error, workdir=root / error) for error in
              ('InputError', 'NonFiniteError', 'Diverged', 'WriteError', 'Preempted', 'SIGTERM')}

  cases = {name: {'argv': a} for name, (a, _) in bad_input.items()}
  cases.update({name: {'argv': a, 'raises': name} for name, a in outcomes.items()})
  (root / 'cases.json').write_text(json.dumps(cases))
  with workdirs.run_lock(str(root / 'busy')):
    before = {d: snapshot(root / d) for d in ('other_model', 'same_model', 'broken_run', 'busy')}
    proc = subprocess.run([sys.executable, '-c', RUNNER, root / 'cases.json',
                           root / 'results.json'],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert {d: snapshot(root / d) for d in before} == before
  results = json.loads((root / 'results.json').read_text())
  assert results['control']['compile_events'], results['control']  # The listener hears.
  return root, {name: (named, results[name]) for name, (_, named) in bad_input.items()}, {
      name: results[name] for name in outcomes}


def test_bad_input_is_one_line_and_exit_2_before_any_compilation(cli):
  _, bad_input, _ = cli
  for name, (named, result) in bad_input.items():
    lines = result['stderr'].splitlines()
    assert result['code'] == 2, (name, result)
    assert len(lines) == 1 and lines[0].startswith('error: '), (name, result)
    assert named in lines[0], (name, result)
    assert result['compile_events'] == [], (name, result)  # Nothing compiled.


def test_bad_input_touches_no_workdir(cli):
  root, _, _ = cli
  assert not (root / 'fresh').exists()
  assert not (root / 'a_file' / 'run').exists()
  # The existing runs' files, checked in the fixture right after the cases.


def test_trainer_outcomes_map_to_exit_codes(cli):
  _, _, outcomes = cli
  assert {name: r['code'] for name, r in outcomes.items()} == {
      'InputError': 2, 'NonFiniteError': 3, 'Diverged': 3, 'WriteError': 74, 'Preempted': 75,
      'SIGTERM': 75}
  assert outcomes['InputError']['stderr'] == 'error: the trainer says why\n'
  assert outcomes['NonFiniteError']['stderr'] == 'error: the trainer says why\n'
  assert outcomes['WriteError']['stderr'] == 'error: the trainer says why\n'
  assert 'the trainer says why' in outcomes['Preempted']['stderr']
  assert 'error' not in outcomes['Preempted']['stderr']
  # A signal before the training loop is kept for it, not lost or fatal.
  assert 'the trainer found SIGTERM' in outcomes['SIGTERM']['stderr']


def test_trainer_outcomes_release_the_workdir_lock(cli):
  root, _, outcomes = cli
  assert [os.path.exists(root / name / 'lock') for name in outcomes] == [False] * len(outcomes)
  assert not (root / 'busy' / 'lock').exists()  # Released by this process.


def test_workdir_lock_is_taken_over_from_a_dead_run_and_leaves_the_rest(tmp_path, caplog):
  """A run SIGKILLed on this host leaves its lock file, its flock gone: the
  next run takes it over, says so, and removes it when done; the workdir's
  other files are untouched."""
  host, lock = socket.gethostname(), tmp_path / 'lock'
  (tmp_path / 'config.json').write_text('{}')
  dead = subprocess.Popen(['true'])
  dead.wait()
  lock.write_text(f'{host} {dead.pid}\n')
  with caplog.at_level(logging.WARNING), workdirs.run_lock(str(tmp_path)):
    assert lock.read_text() == f'{host} {os.getpid()}\n'
    with pytest.raises(workdirs.InputError, match=re.escape(
        f'workdir {tmp_path} is in use by host {host} pid {os.getpid()} (its lock: {lock})')):
      with workdirs.run_lock(str(tmp_path)):
        pass
  assert f'Taking over the lock {lock} of host {host} pid {dead.pid}, which ended' in caplog.text
  assert os.listdir(tmp_path) == ['config.json'] and (tmp_path / 'config.json').read_text() == '{}'


def test_workdir_lock_of_another_host_is_refused(tmp_path):
  """Where flocks do not reach across hosts, a run on another host may hold
  the workdir with its flock free here: refused, and kept."""
  (tmp_path / 'lock').write_text('node17 4242\n')
  with pytest.raises(workdirs.InputError, match=re.escape(
      f'workdir {tmp_path} is in use by host node17 pid 4242 (its lock: {tmp_path}/lock); '
      'if that run has ended, delete the lock')):
    with workdirs.run_lock(str(tmp_path)):
      pass
  assert (tmp_path / 'lock').read_text() == 'node17 4242\n'


def test_unwritable_workdir(tmp_path, monkeypatch):
  """The check behind the CLI's 'read-only workdir' case, which root (CI)
  cannot run: a directory that exists but refuses writes."""
  real = os.access
  monkeypatch.setattr(os, 'access', lambda path, mode: (
      False if str(path) == str(tmp_path) and mode == os.W_OK else real(path, mode)))
  with pytest.raises(workdirs.InputError, match=f'^workdir {tmp_path} is not writable$'):
    workdirs.check_workdir(helpers.tiny_config(), str(tmp_path))


def test_help_and_a_config_file_anywhere(tmp_path):
  """--help prints the usage; a recipe outside the repository, run from
  another directory, imports the installed configs package."""
  out = subprocess.run([sys.executable, '-m', 'bnfree_jax.main', '--help'], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 0
  for text in ('--config CONFIG.py[:arg]', '--config.key=value', 'configs/default.py',
               '75 preempted'):
    assert text in out.stdout, text
  (tmp_path / 'mine.py').write_text(
      'from configs import fashion_mnist\n\n\ndef get_config():\n'
      '  c = fashion_mnist.get_config()\n  c.dataset = "synthetic"\n  return c\n')
  out = subprocess.run([sys.executable, '-m', 'bnfree_jax.main', '--config', 'mine.py',
                        '--workdir', 'run', '--config.batch_size=0'], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
  assert (out.returncode, out.stderr) == (2, 'error: batch_size=0 must be an integer > 0\n')
  assert not (tmp_path / 'run').exists()
