"""Where the GPU-target tests find jax's CUDA plugin: this interpreter, else the one of .venv-cuda (made by
scripts/cuda_compile_env.sh). Those tests run their compiles in that interpreter and skip, saying so, without it."""

import importlib.util
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def cuda_python() -> str | None:
  """An interpreter with jax's CUDA plugin: this one, else .venv-cuda's; None when neither has it."""
  if importlib.util.find_spec("jax_cuda12_plugin") is not None:
    return sys.executable
  venv = ROOT / ".venv-cuda" / "bin" / "python"
  if venv.exists() and subprocess.run([venv, "-c", "import jax_cuda12_plugin"], capture_output=True,
                                      check=False).returncode == 0:
    return str(venv)
  return None
