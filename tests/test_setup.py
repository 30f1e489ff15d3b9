"""README's two set-up commands run as written, as root without sudo (most
containers, CI runners, cloud images) and as a user with sudo, and
scripts/setup.sh installs what is missing the right way or says in one line
why it cannot: with every command they call stubbed to record its arguments."""

import os
import re
import shutil
import subprocess

import pytest

from conftest import REPO
from helpers import stub

PACKAGES = 'python3-venv dataset-fashion-mnist'
# What the stubs do: record themselves; id and dpkg answer as FAKE_UID and
# INSTALLED say; python3 -m venv makes a .venv whose activate puts its own
# recording pip and python first on PATH.
RECORD = 'echo "{name} $*" >> "$CALLS"\n'
STUBS = {
    'id': 'echo "$FAKE_UID"\n',
    'dpkg': 'case " $INSTALLED " in *" $2 "*) exit 0;; esac\nexit 1\n',
    'apt-get': RECORD.format(name='apt-get') + 'exit "${APT_EXIT:-0}"\n',
    'sudo': RECORD.format(name='sudo'),
    'python3': (RECORD.format(name='python3') +
                '[ "$1 $2" = "-m venv" ] && cp -r "$VENV_TEMPLATE" "$3"\n'),
}


def readme_setup_commands():
  """The README's bash commands that set up a machine."""
  blocks = re.findall(r'```bash\n(.*?)```', (REPO / 'README.md').read_text(), re.S)
  return [b.strip() for b in blocks if 'setup.sh' in b]


def run_in(tmp_path, command, uid, sudo=True, installed='', apt_exit=0):
  """(exit code, stderr, recorded calls) of `bash -c command` in a copy of
  scripts/ whose PATH holds only the stubs."""
  bin_dir, venv = tmp_path / 'bin', tmp_path / 'venv_template'
  for name, body in STUBS.items():
    if name != 'sudo' or sudo:
      stub(bin_dir, name, body)
  for tool in ('bash', 'sh', 'cp'):  # What the commands and stubs themselves run.
    (bin_dir / tool).symlink_to(shutil.which(tool))
  (venv / 'bin').mkdir(parents=True)
  for name in ('pip', 'python', 'python3'):
    stub(venv / 'bin', name, RECORD.format(name=f'.venv/{name}'))
  (venv / 'bin' / 'activate').write_text('PATH="$PWD/.venv/bin:$PATH"\n')
  work = tmp_path / 'repo'
  shutil.copytree(REPO / 'scripts', work / 'scripts')
  calls = tmp_path / 'calls'
  calls.touch()
  env = {'PATH': str(bin_dir), 'CALLS': str(calls), 'FAKE_UID': str(uid),
         'INSTALLED': installed, 'APT_EXIT': str(apt_exit), 'VENV_TEMPLATE': str(venv),
         'HOME': str(tmp_path)}
  proc = subprocess.run([shutil.which('bash'), '-c', command], cwd=work, env=env,
                        capture_output=True, text=True, timeout=60)
  return proc.returncode, proc.stderr, calls.read_text().splitlines()


def test_ci_runs_the_setup_script_and_the_readme_test_command():
  tests_section = (REPO / 'README.md').read_text().split('\n## Tests\n', 1)[1]
  command = re.search(r'```bash\n(.*?)\n```', tests_section)[1]
  assert command == 'python3 -m pytest -q -n 2 --dist loadfile tests'
  ci = [line for line in (REPO / '.ci/run').read_text().splitlines()
        if line and not line.startswith('#')]
  assert 'sh scripts/setup.sh' in ci and ci[-1] == command


def test_readme_has_the_two_setup_commands_without_sudo():
  commands = readme_setup_commands()
  assert len(commands) == 2, commands
  assert not any('sudo' in c for c in commands)
  assert commands[1].endswith('&& python3 -m pytest -q -n 2 --dist loadfile tests')


@pytest.mark.parametrize('uid,sudo', [(0, ''), (1000, 'sudo ')], ids=['root', 'user'])
@pytest.mark.parametrize('which,extra,last', [
    (0, '.', '.venv/python -m bnfree_jax.main --config configs/fashion_mnist.py '
             '--workdir runs/fmnist'),
    (1, '.[dev]', '.venv/python3 -m pytest -q -n 2 --dist loadfile tests'),
], ids=['quickstart', 'tests'])
def test_readme_setup_command_runs_as_written(tmp_path, uid, sudo, which, extra, last):
  code, err, calls = run_in(tmp_path, readme_setup_commands()[which], uid)
  assert code == 0, err
  assert calls == [f'{sudo}apt-get update -qq', f'{sudo}apt-get install -y -qq {PACKAGES}',
                   'python3 -m venv .venv', f'.venv/pip install -e {extra}',
                   last]


def test_without_root_or_sudo_it_says_so_in_one_line_and_stops(tmp_path):
  code, err, calls = run_in(tmp_path, readme_setup_commands()[0], 1000, sudo=False)
  assert code == 2 and calls == []  # Not even the venv: the && chain stops.
  assert err.count('\n') == 1 and 'needs root, and there is no sudo' in err, err
  assert PACKAGES in err


@pytest.mark.parametrize('installed,calls', [
    (PACKAGES, []),  # A rerun, offline too: no apt-get at all.
    ('python3-venv', ['apt-get update -qq', 'apt-get install -y -qq dataset-fashion-mnist']),
])
def test_installs_only_what_is_missing(tmp_path, installed, calls):
  assert run_in(tmp_path, 'sh scripts/setup.sh', 0, installed=installed)[::2] == (0, calls)


def test_apt_get_failure_is_its_exit_code(tmp_path):
  code, _, calls = run_in(tmp_path, 'sh scripts/setup.sh', 0, apt_exit=100)
  assert (code, calls) == (100, ['apt-get update -qq'])
