"""launch/: the shell scripts run the trainer as documented (srun, scontrol
and python stubbed), the sweep prints the right commands, reruns preempted
runs, goes on after failures, and skips a run that finished (one real tiny
run, ~1 min on 2 CPU cores)."""

import os
import subprocess
import sys

import pytest

from conftest import REPO
from helpers import stub
from launch import sweep

ROW = 'configs/paper/t1_wn.py'


def run_sweep(*args, timeout=600):
  # One CPU device compiles the tiny run faster than the tests' usual four.
  env = {**os.environ, 'JAX_NUM_CPU_DEVICES': '1'}
  return subprocess.run([sys.executable, '-m', 'launch.sweep', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def sweep_lines(out):
  return [line for line in out.splitlines() if line.startswith('sweep:')]


@pytest.mark.parametrize('code', [75, 0, 2, 3])
def test_slurm_sbatch_requeues_on_exit_75_only(tmp_path, code):
  """With srun and scontrol stubbed on PATH: the job runs the trainer in the
  submission directory and exits with its code; only 75 (preempted, saved)
  requeues the job."""
  calls = tmp_path / 'calls'
  stub(tmp_path / 'bin', 'srun', f'echo "$PWD: srun $*" >> {calls}\nexit {code}\n')
  stub(tmp_path / 'bin', 'scontrol', f'echo "$PWD: scontrol $*" >> {calls}\n')
  submit = tmp_path / 'submitted_from'
  submit.mkdir()
  env = {**os.environ, 'PATH': f'{tmp_path / "bin"}:{os.environ["PATH"]}',
         'SLURM_JOB_ID': '1234', 'SLURM_SUBMIT_DIR': str(submit)}
  args = ['configs/paper/t1_wn.py:small', 'runs/t1', '--config.seed=1']
  if code == 2:  # CONFIG and WORKDIR from the environment instead.
    env.update(CONFIG=args[0], WORKDIR=args[1])
    args = []
  r = subprocess.run(['bash', str(REPO / 'launch' / 'slurm.sbatch'), *args], cwd=tmp_path,
                     env=env, capture_output=True, text=True)
  assert r.returncode == code, r.stderr
  trainer = (f'{submit}: srun python -m bnfree_jax.main --config configs/paper/t1_wn.py:small '
             '--workdir runs/t1')
  want = [trainer + ('' if code == 2 else ' --config.seed=1')]
  if code == 75:
    want.append(f'{submit}: scontrol requeue 1234')
    assert 'requeueing job 1234' in r.stderr
  assert calls.read_text().splitlines() == want


def test_slurm_sbatch_without_config_is_usage(tmp_path):
  env = {k: v for k, v in os.environ.items() if k not in ('CONFIG', 'WORKDIR')}
  r = subprocess.run(['bash', str(REPO / 'launch' / 'slurm.sbatch')], cwd=tmp_path, env=env,
                     capture_output=True, text=True)
  assert r.returncode != 0 and 'usage: sbatch launch/slurm.sbatch' in r.stderr


def test_local_sh_runs_one_process_outside_slurm(tmp_path):
  """Inside an allocation, the trainer must not see the launcher's variables
  (it would wait for peers); the rest of the environment and the exit code
  pass through. $PYTHON is the interpreter local.sh runs."""
  python = stub(tmp_path / 'bin', 'python',
                'echo "args: $*"\n'
                'for v in SLURM_NTASKS OMPI_COMM_WORLD_SIZE JAX_COORDINATOR_ADDRESS \\\n'
                '         SLURM_JOB_ID; do\n'
                '  echo "$v=${!v-unset}"\n'
                'done\nexit 3\n')
  env = {**os.environ, 'PYTHON': str(python), 'SLURM_NTASKS': '8', 'OMPI_COMM_WORLD_SIZE': '4',
         'JAX_COORDINATOR_ADDRESS': 'node0:1234', 'SLURM_JOB_ID': '99'}
  r = subprocess.run([str(REPO / 'launch' / 'local.sh'), 'configs/resnet18_wn.py', 'runs/r18',
                      '--config.batch_size=32'], env=env, capture_output=True, text=True)
  assert r.returncode == 3, r.stderr
  assert r.stdout.splitlines() == [
      'args: -m bnfree_jax.main --config configs/resnet18_wn.py --workdir runs/r18 '
      '--config.batch_size=32',
      'SLURM_NTASKS=unset', 'OMPI_COMM_WORLD_SIZE=unset', 'JAX_COORDINATOR_ADDRESS=unset',
      'SLURM_JOB_ID=99']


def test_local_sh_usage_is_exit_2():
  r = subprocess.run([str(REPO / 'launch' / 'local.sh')], capture_output=True, text=True)
  assert r.returncode == 2 and 'usage' in r.stderr


def test_dry_run_prints_commands(tmp_path):
  listing = tmp_path / 'runs.txt'
  listing.write_text('# comment\n\nconfigs/paper/t2_wn_clip_lr0p01.py:small  # twin\n')
  r = run_sweep('--dry-run', '--workdir', 'ROOT', f'{ROW}:small', 'configs/resnet18_wn.py',
                '--list', str(listing), '--', '--config.seed=1')
  assert r.returncode == 0, r.stderr
  assert [line.split(' ', 1)[1] for line in r.stdout.splitlines()] == [
      f'-m bnfree_jax.main --config {ROW}:small --workdir ROOT/t1_wn_small --config.seed=1',
      '-m bnfree_jax.main --config configs/resnet18_wn.py --workdir ROOT/resnet18_wn '
      '--config.seed=1',
      '-m bnfree_jax.main --config configs/paper/t2_wn_clip_lr0p01.py:small '
      '--workdir ROOT/t2_wn_clip_lr0p01_small --config.seed=1']


def test_two_runs_in_one_workdir_is_exit_2():
  r = run_sweep('--dry-run', '--workdir', 'ROOT', ROW, 'elsewhere/t1_wn.py')
  assert r.returncode == 2 and 'ROOT/t1_wn' in r.stderr


class FakeStop:
  signum = None


def fake_configs(tmp_path, *names):
  for name in names:
    (tmp_path / f'{name}.py').touch()
  return [str(tmp_path / f'{name}.py') for name in names]


def test_reruns_after_preemption_and_goes_on_after_failure(tmp_path, capsys):
  codes = {'a': [75, 75, 0], 'b': [2], 'c': [75, 75, 75]}
  calls = []

  def fake_run(cmd, stop):
    name = os.path.basename(cmd[cmd.index('--workdir') + 1])
    calls.append(name)
    return codes[name].pop(0)

  rc = sweep.sweep(fake_configs(tmp_path, 'a', 'b', 'c'), str(tmp_path), [], retries=2,
                   run=fake_run, stop=FakeStop())
  assert rc == 1
  assert calls == ['a', 'a', 'a', 'b', 'c', 'c', 'c']
  lines = sweep_lines(capsys.readouterr().out)
  status = {line.split()[1]: line for line in lines if line.split()[1] in ('a', 'b', 'c')}
  assert ' done ' in status['a'] and 'bad input' in status['b'] and 'preempted' in status['c']
  assert '3 runs: 1 done, 1 bad input, 1 preempted' in lines[-1]


def test_a_stopped_sweep_starts_nothing_more(tmp_path, capsys):
  stop = FakeStop()

  def fake_run(cmd, stop_):
    stop_.signum = 15  # SIGTERM arrived during this run.
    return 75

  specs = fake_configs(tmp_path, 'a', 'b')
  assert sweep.sweep(specs, str(tmp_path), [], run=fake_run, stop=stop) == 75
  lines = sweep_lines(capsys.readouterr().out)
  assert 'preempted' in lines[0] and 'not started' in lines[1]


def files_under(path):
  return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
          for d, _, fs in os.walk(path) for f in fs}


def test_runs_then_skips_a_finished_run(tmp_path):
  # Bad input (exit 2 from the trainer, or no such file) fails that run only.
  r = run_sweep('--workdir', str(tmp_path), 'configs/paper/missing.py', f'{ROW}:large',
                f'{ROW}:tiny')
  lines = sweep_lines(r.stdout)
  assert r.returncode == 1, r.stdout + r.stderr
  assert 'missing' in lines[0] and 'bad input (no such config file)' in lines[0]
  assert 't1_wn_large' in lines[1] and 'bad input (exit 2)' in lines[1]
  assert 't1_wn_tiny' in lines[2] and ' done ' in lines[2], r.stdout + r.stderr[-3000:]
  assert '3 runs: 2 bad input, 1 done' in lines[3]
  workdir = tmp_path / 't1_wn_tiny'
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4']
  before = files_under(workdir)

  r = run_sweep('--workdir', str(tmp_path), f'{ROW}:tiny')
  assert r.returncode == 0, r.stdout + r.stderr
  assert 'skipped (finished at step 4)' in sweep_lines(r.stdout)[0]
  assert 'Training' not in r.stderr  # No trainer was started.
  assert files_under(workdir) == before


def test_gpu_check_sh_names_results_after_the_gpu(tmp_path):
  """With nvidia-smi and python3 stubbed on PATH: the suite runs from the
  repository root with its results named after the GPU, the flags given
  passed on, a log kept, and the suite's exit code returned."""
  stub(tmp_path / 'bin', 'nvidia-smi', 'echo "NVIDIA H100 80GB HBM3"\n')
  stub(tmp_path / 'bin', 'python3', 'echo "$PWD: python3 $*"\nexit 3\n')
  env = {**os.environ, 'PATH': f'{tmp_path / "bin"}:{os.environ["PATH"]}',
         'WHEELS': str(tmp_path / 'no_wheels')}
  out = tmp_path / 'out'
  r = subprocess.run([str(REPO / 'launch' / 'gpu_check.sh'), str(out), '--e2e-steps', '0'],
                     cwd=tmp_path, env=env, capture_output=True, text=True)
  assert r.returncode == 3, r.stderr
  name = out / 'gpu_h100_80gb_hbm3'
  assert r.stdout.splitlines() == [
      f'{REPO}: python3 -m bnfree_jax.bench --suite gpu --json {name}.json --md {name}.md '
      '--e2e-steps 0']
  assert (out / 'gpu_h100_80gb_hbm3.log').read_text() == r.stdout


def test_gpu_check_sh_usage_is_exit_2():
  r = subprocess.run([str(REPO / 'launch' / 'gpu_check.sh')], capture_output=True, text=True)
  assert r.returncode == 2 and 'usage' in r.stderr
