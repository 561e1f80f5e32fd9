#!/usr/bin/env bash
# The kernel table on a GPU machine (or any platform): every sparse-core op against its XLA dense baseline at 7B
# shapes, time, speedup and achieved bandwidth against a device-to-device copy. Finishes in a few minutes.
#   bash scripts/bench_gpu.sh            # on the GPU machine
#   bash scripts/bench_gpu.sh --dry      # tiny shapes on the CPU: checks the script
# PYTHON names the interpreter (default python3, e.g. the one of an activated virtual environment).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [[ "${1:-}" != "--dry" ]] && ! "$PYTHON" -c "import jax, sys; sys.exit(jax.default_backend() == 'cpu')"; then
  echo "bench_gpu.sh: no GPU/TPU visible to JAX; use --dry for the CPU check" >&2
  exit 2
fi
exec "$PYTHON" scripts/bench_kernels.py "$@"
