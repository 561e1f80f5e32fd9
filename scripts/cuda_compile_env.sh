#!/usr/bin/env bash
# The CUDA compile environment of `qsparse compile --topology h100x8 | h200x8 | h200x16 ...`: a separate virtual
# environment, .venv-cuda (gitignored), with jax's CUDA 12 plugin and its CUDA libraries (about 6 GB) at the version
# of the project's jax, and the project itself, editable. No GPU is needed: XLA compiles for the GPUs described in
# qsparse_jax/training/gpu_specs/. It stays separate because jax[cuda12] and libtpu in one environment fight over
# which backend jax starts.
#   bash scripts/cuda_compile_env.sh                   # makes (or updates) .venv-cuda
#   .venv-cuda/bin/qsparse compile --config configs/paper_1p3b.py --topology h200x8
# VENV names another directory; PYTHON the interpreter to make it with (default python3, 3.11 or newer); JAX the jax
# version (default: the one the project's .venv has, else the newest jax[cuda12]). PLUGIN_ONLY=1 stops after jax's
# CUDA plugin (CI installs it beside .venv, then runs this again for the project once .venv is done).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv-cuda}"
PYTHON="${PYTHON:-python3}"
if [[ -z "${JAX:-}" && -x .venv/bin/python ]]; then
  JAX="$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("jax"))' 2>/dev/null || true)"
fi
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet "jax[cuda12]${JAX:+==$JAX}"
[[ -n "${PLUGIN_ONLY:-}" ]] && exit 0
"$VENV/bin/pip" install --quiet -e .
JAX_PLATFORMS=cpu "$VENV/bin/python" -c "import jax_cuda12_plugin, jax; print('cuda compile environment:', '$VENV', \
'jax', jax.__version__)"
