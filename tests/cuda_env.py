"""Where the GPU-target tests find jax's CUDA plugin: the interpreter QSPARSE_CUDA_PYTHON names, else this one, else
the one of .venv-cuda (made by scripts/cuda_compile_env.sh). Those tests run their compiles in that interpreter and
skip, saying so, without it."""

import importlib.util
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def cuda_python() -> str | None:
  """An interpreter with jax's CUDA plugin: $QSPARSE_CUDA_PYTHON (which must have it), else this one, else
  .venv-cuda's; None when none has it."""
  if os.environ.get("QSPARSE_CUDA_PYTHON"):
    named = os.environ["QSPARSE_CUDA_PYTHON"]
    found = subprocess.run([named, "-c", "import jax_cuda12_plugin, qsparse_jax"], capture_output=True, check=False)
    if found.returncode != 0:
      raise RuntimeError(f"QSPARSE_CUDA_PYTHON={named} cannot import jax_cuda12_plugin and qsparse_jax: "
                         f"{found.stderr.decode()[-300:]}")
    return named
  if importlib.util.find_spec("jax_cuda12_plugin") is not None:
    return sys.executable
  venv = ROOT / ".venv-cuda" / "bin" / "python"
  if venv.exists() and subprocess.run([venv, "-c", "import jax_cuda12_plugin"], capture_output=True,
                                      check=False).returncode == 0:
    return str(venv)
  return None
