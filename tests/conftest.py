"""Shared test setup: 4 simulated CPU devices, and config loading."""

import importlib
import os
import pathlib
import tempfile

# Before JAX starts its backend: every test sees 4 CPU devices, so sharded code
# paths run for real; single-device runs use a sub-mesh.
os.environ.setdefault('JAX_NUM_CPU_DEVICES', '4')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Tests compile the same small programs again and again (a resumed run, a
# rerun): a session-wide persistent cache pays for each compilation once.
# JAX reads these when it is imported, so they come before anything imports it.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', tempfile.mkdtemp(prefix='bnfree_jax_xla_'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
# The tests' programs are tiny, so compiling them is most of their time:
# LLVM at -O0 halves that (the tiny train step: 18 s -> 9 s; test_dp_sgd
# 316 s -> 188 s; the suite 13.4 -> 10.7 min), and XLA:CPU's older
# elemental emitters in place of its MLIR fusion emitters more than halve it
# again at the same step time (results/bench/cpu_flags_test_compile.md: 7 s
# -> 3 s; the suite 663 s -> 482 s on a 2-core AMD EPYC). Nothing asserts on
# speed, and a test that only passed under one codegen would be asserting
# rounding.
FAST_COMPILE = '--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false'
if '--xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

from bnfree_jax import runtime  # noqa: E402

# As the CLI does: 4 devices on 2 loaded cores must not abort an all-reduce
# after XLA's default 40 s (JAX reads XLA_FLAGS when its backend starts).
runtime.patient_cpu_collectives()

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_config(relpath: str, arg: str | None = None):
  """get_config() of a file under configs/ (an installed package)."""
  module = importlib.import_module('configs.' + relpath.removesuffix('.py').replace('/', '.'))
  return module.get_config(arg) if arg is not None else module.get_config()


@pytest.fixture
def default_config():
  return load_config('default.py')
