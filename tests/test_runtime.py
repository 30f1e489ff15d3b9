"""Processes and devices (bnfree_jax/runtime.py)."""

import os
import subprocess
import sys


def test_cpu_devices_wait_for_each_other_as_long_as_processes_do():
  """XLA:CPU's 40 s default for the devices of one process to meet at an
  all-reduce is raised (a loaded host starved one device that long), without
  overriding a value the user set."""
  code = """
import os
from bnfree_jax import runtime
runtime.use_cpu_cores(8)
print(os.environ['XLA_FLAGS'])
import jax, jax.numpy as jnp
print(jax.device_count(), float(jax.jit(lambda x: x.sum())(jnp.ones(8))))
"""
  env = {k: v for k, v in os.environ.items() if k not in ('JAX_NUM_CPU_DEVICES', 'XLA_FLAGS')}
  out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                       check=True).stdout.splitlines()
  assert out[0] == '--xla_cpu_collective_call_terminate_timeout_seconds=1800'
  cores = len(os.sched_getaffinity(0))
  devices = max(d for d in range(1, cores + 1) if 8 % d == 0)
  assert out[1] == f'{devices} 8.0'  # XLA accepted the flag.
  env['XLA_FLAGS'] = '--xla_cpu_collective_call_terminate_timeout_seconds=7'
  out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                       check=True).stdout.splitlines()
  assert out[0] == '--xla_cpu_collective_call_terminate_timeout_seconds=7'
