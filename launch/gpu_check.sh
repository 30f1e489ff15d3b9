#!/usr/bin/env bash
# The GPU suite of bnfree_jax.bench on this host, in at most 9 minutes:
# installs the carried wheels (clu, ml_collections, tensorboardX) if a wheel
# folder is there, names the results after the GPU, and keeps a log.
#
#   launch/gpu_check.sh OUT_DIR [bench flags ...]
#   launch/gpu_check.sh results/bench
#   launch/gpu_check.sh "$OUT" --compute-dtype float32 --e2e-steps 0
#
# Writes OUT_DIR/gpu_<gpu>.json, .md and .log (<gpu> from nvidia-smi, e.g.
# h100_80gb_hbm3). WHEELS=DIR names the wheel folder (default .whl, as the
# device tool carries it). launch/gpu_check.md says how to get the wheels.
# Exit codes: those of python -m bnfree_jax.bench; 124 past the 540 s limit
# (what was measured is in the JSON, written row by row); 2 bad usage.
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: $0 OUT_DIR [bench flags ...]" >&2
  exit 2
fi
out=$1
shift

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"  # The bench and its workers import bnfree_jax and configs from here.

wheels=${WHEELS:-.whl}
if compgen -G "$wheels/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/bnfree_site "$wheels"/*.whl
  export PYTHONPATH="/tmp/bnfree_site${PYTHONPATH:+:$PYTHONPATH}"
fi

gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1 | tr '[:upper:]' '[:lower:]' \
  | sed -E 's/^nvidia //; s/[^a-z0-9]+/_/g; s/^_+|_+$//g')
mkdir -p "$out"
# The suite's own budget (470 s) ends it; the timeout is only a backstop.
PYTHONUNBUFFERED=1 timeout 540 python3 -m bnfree_jax.bench --suite gpu \
  --json "$out/gpu_$gpu.json" --md "$out/gpu_$gpu.md" "$@" 2>&1 | tee "$out/gpu_$gpu.log"
