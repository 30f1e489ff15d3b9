#!/usr/bin/env bash
# One training process on this host, driving all its local GPUs (JAX splits
# each batch over every device the process sees; CUDA_VISIBLE_DEVICES narrows
# that down).
#
#   launch/local.sh CONFIG[:arg] WORKDIR [--config.key=value ...]
#   launch/local.sh configs/paper/t1_wn.py:small runs/paper/t1_wn_small
#
# Exit codes, from bnfree_jax/main.py:
#    0  finished
#    2  bad input (config, data or workdir), reported before anything compiles
#    3  the loss or gradient became non-finite (see the message for the last
#       good checkpoint)
#   75  stopped by SIGTERM/SIGINT after saving a checkpoint: run the same
#       command again to resume
# Several configs one after another, with resume and reruns: launch/sweep.py.
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG[:arg] WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2

# main.py joins a multi-process run when it sees a launcher's variables; this
# is one process, which must not wait for peers even inside a SLURM allocation.
exec env -u SLURM_NTASKS -u OMPI_COMM_WORLD_SIZE -u JAX_COORDINATOR_ADDRESS \
  "${PYTHON:-python}" -m bnfree_jax.main --config "$config" --workdir "$workdir" "$@"
