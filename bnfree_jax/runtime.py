"""Processes and devices: joining a multi-process run, the CPU device count,
the stop signals every process must agree on, and feeding host arrays to the
mesh."""

import os
import resource
import signal

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils

# How long the processes of a run wait for the slowest of them to start.
_BARRIER_TIMEOUT_MS = 30 * 60 * 1000
# XLA:CPU aborts the process when one CPU device reaches an all-reduce more
# than 40 s (its default) after another. On a loaded host one device's thread
# can be descheduled that long (seen: a Fashion-MNIST run at load average 7
# died with SIGABRT in its last eval), so the devices wait as long as the
# processes do.
PATIENT_CPU_COLLECTIVES = '--xla_cpu_collective_call_terminate_timeout_seconds=1800'


def launched_by_cluster() -> bool:
  """Whether a launcher whose environment jax.distributed.initialize() reads
  itself (SLURM, Open MPI, or JAX's own variables) started several processes."""
  return (int(os.environ.get('SLURM_NTASKS', 1)) > 1
          or int(os.environ.get('OMPI_COMM_WORLD_SIZE', 1)) > 1
          or 'JAX_COORDINATOR_ADDRESS' in os.environ)


def initialize_distributed(coordinator_address=None, num_processes=None,
                           process_id=None) -> bool:
  """Joins a multi-process run if the arguments or the launcher ask for one;
  returns whether it did. Raises ValueError for a partial set of arguments."""
  # CPU processes talk through gloo; GPUs use NCCL regardless of this setting.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  # JAX's preemption service would install its own SIGTERM handler over
  # StopSignals' and swallow the signal (it only logs it): a preempted
  # multi-process run would train on, unsaved, until killed.
  jax.config.update('jax_enable_preemption_service', False)
  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise ValueError('--coordinator_address, --num_processes and --process_id '
                       'go together: give all three or none')
    jax.distributed.initialize(*explicit)
  elif launched_by_cluster():
    jax.distributed.initialize()
  else:
    return False
  return True


def use_cpu_cores(*batch_sizes: int) -> int:
  """Gives JAX's CPU backend one device per core, or the most cores that
  split every batch evenly, unless JAX_NUM_CPU_DEVICES is set; returns the
  CPU device count. Call before JAX starts its backends.

  On XLA:CPU the trainer's step runs faster with the batch split over one
  device per core than on a single device using all cores (ResNet-18, 2
  cores: 9-18% less time per step, results/bench/). GPU and TPU hosts keep
  their accelerators as jax.devices(), so it changes nothing there.
  """
  patient_cpu_collectives()
  if 'JAX_NUM_CPU_DEVICES' in os.environ:
    return int(os.environ['JAX_NUM_CPU_DEVICES'])
  cores = len(os.sched_getaffinity(0))
  sizes = [b for b in batch_sizes if isinstance(b, int) and b > 0]  # setup() rejects the rest.
  n = max(d for d in range(1, cores + 1) if all(b % d == 0 for b in sizes))
  jax.config.update('jax_num_cpu_devices', n)
  return n


def patient_cpu_collectives():
  """Adds PATIENT_CPU_COLLECTIVES to XLA_FLAGS unless the flag is set; call
  before JAX starts its backends (XLA reads its flags once)."""
  flags = os.environ.get('XLA_FLAGS', '')
  if PATIENT_CPU_COLLECTIVES.split('=')[0] not in flags:
    os.environ['XLA_FLAGS'] = f'{flags} {PATIENT_CPU_COLLECTIVES}'.strip()


class StopSignals:
  """Turns SIGTERM/SIGINT into a flag the training loop checks after each
  step, so that a signal at any moment ends the run at a step boundary, with a
  checkpoint."""

  def __init__(self):
    self.received = None
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.received = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)

  def requested(self) -> bool:
    # Every process must stop at the same step, or the collective save hangs.
    flag = self.received is not None
    if jax.process_count() > 1:
      flag = bool(multihost_utils.process_allgather(jnp.asarray(flag)).any())
    return flag


def _coordination_client():
  """The client of jax.distributed's coordination service, whose barriers and
  key-value store have no public API."""
  from jax._src import distributed
  return distributed.global_state.client


def wait_for_all_processes(name: str):
  """Returns once every process got here (up to 30 min). The first gloo
  collective, which creates the CPU processes' gloo context, gives each
  process 30 s to join, and on a busy host one process can start its run
  more than that after another; the coordination service's barrier waits."""
  if jax.process_count() > 1:
    _coordination_client().wait_at_barrier(f'bnfree_jax_{name}', _BARRIER_TIMEOUT_MS)


def first_error_of_all_processes(error: str | None) -> str | None:
  """This process's error, else another process's, else None. Every process
  of a multi-process run must call it: a process that stopped alone would
  leave the others waiting at their first barrier for minutes."""
  if jax.process_count() == 1:
    return error
  client = _coordination_client()
  client.key_value_set(f'bnfree_jax_input_error/{jax.process_index()}', error or '')
  for i in range(jax.process_count()):
    other = client.blocking_key_value_get(f'bnfree_jax_input_error/{i}', _BARRIER_TIMEOUT_MS)
    if other and not error:
      error = f'process {i}: {other}'
  return error


def global_array(sharding, local):
  """The global arrays whose rows on this process are `local`'s (a pytree)."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local)


def peak_memory_gb() -> float:
  """Peak memory of the first local device, or of this process where the
  backend keeps no statistics (CPU)."""
  stats = jax.local_devices()[0].memory_stats()
  if stats and 'peak_bytes_in_use' in stats:
    return stats['peak_bytes_in_use'] / 2**30
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux.
