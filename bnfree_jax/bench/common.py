"""What the benchmarks share: recipes, the machine a record names, the load
other processes put on it, and writing tables and records."""

import importlib
import json
import os
import pathlib
import platform
import statistics
import sys

import jax
import jaxlib

# The checkout's root: workers and the end-to-end run start there, so they
# import the same bnfree_jax as this process.
REPO = pathlib.Path(__file__).resolve().parents[2]


def progress(message):
  print(f'[bench] {message}', file=sys.stderr, flush=True)


def split(text):
  return [item.strip() for item in text.split(',') if item.strip()]


def load_config(name):
  """get_config() of the recipe configs/NAME.py."""
  return importlib.import_module(f'configs.{name}').get_config()


def machine():
  """What every record carries so figures from different runs can be
  compared. Starts JAX's backends."""
  device = jax.devices()[0]
  return dict(device=f'{device.platform}:{device.device_kind} x{jax.device_count()}',
              jax_version=jax.__version__, jaxlib_version=jaxlib.__version__,
              xla_flags=os.environ.get('XLA_FLAGS', ''), cpu_count=os.cpu_count(),
              host=platform.node())


def cpu_seconds():
  """(wall, CPU seconds all cores were busy, CPU seconds of this process and
  its children) so far, or None where /proc/stat is missing (not Linux)."""
  try:
    with open('/proc/stat') as f:
      jiffies = [int(x) for x in f.readline().split()[1:]]
  except OSError:
    return None
  busy = (sum(jiffies) - jiffies[3] - jiffies[4]) / os.sysconf('SC_CLK_TCK')  # Not idle, iowait.
  t = os.times()
  return t.elapsed, busy, t.user + t.system + t.children_user + t.children_system


def other_cores(start, end):
  """Cores that other processes kept busy on average between two
  cpu_seconds(): the load average counts the bench itself, this does not."""
  if not (start and end) or end[0] <= start[0]:
    return None
  return max(0.0, ((end[1] - start[1]) - (end[2] - start[2])) / (end[0] - start[0]))


def cpu_record(cpu_seconds):
  """The CPU time of timed steps (all this process's threads): on a shared
  machine a step's wall time includes the time its threads waited for a
  core, its CPU time does not, so with one thread it is the steadier figure
  of the work a step takes. torch_peer.py records the same keys."""
  return dict(step_cpu_ms=1e3 * statistics.median(cpu_seconds),
              step_cpu_times_ms=[1e3 * t for t in cpu_seconds])


def cores(value):
  return 'n/a' if value is None else f'{value:.2f}'


def cell(value, fmt, scale=1.0):
  return '—' if value is None else format(value * scale, fmt)


def mb(value):
  return 'n/a' if value is None else f'{value / 2**20:.0f}'


def write_json(path, records):
  """Replaces PATH whole, so a reader (or a cut-off run) never sees half a file."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(f'{path}.tmp', 'w') as f:
    json.dump(records, f, indent=1)
  os.replace(f'{path}.tmp', path)


def write_md(path, text):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    f.write(text)
