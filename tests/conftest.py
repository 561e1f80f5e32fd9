"""Test setup, before any backend is used:

- 8 CPU devices for the multi-device tests;
- one XLA compilation cache per test session, shared by the xdist workers and the subprocesses the tests start (the
  CLI, the multi-process runs): many tests compile the same small train, eval and decode programs, and XLA:CPU
  compilation is most of the suite's time (tests/test_train.py takes half as long with it). The cache starts empty at
  every session, so a session proves what a fresh install compiles, and is removed at its end. Jit's in-memory cache,
  which the compile-count tests read, is not affected;
- the longest files collected first, so the two xdist workers finish together.
"""

import os
import pathlib
import shutil
import tempfile

import jax

jax.config.update("jax_num_cpu_devices", 8)

# Made by the process that loads this first (pytest's controller), named to the xdist workers it starts and to every
# subprocess through the environment, and removed by it at the end.
_OWNER = "QSPARSE_TESTS_XLA_CACHE" not in os.environ
if _OWNER:
  os.environ["QSPARSE_TESTS_XLA_CACHE"] = tempfile.mkdtemp(prefix="qsparse-jax-tests-xla-cache-")
CACHE_DIR = pathlib.Path(os.environ["QSPARSE_TESTS_XLA_CACHE"])
os.environ.update({"JAX_COMPILATION_CACHE_DIR": str(CACHE_DIR), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                   "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"})
jax.config.update("jax_compilation_cache_dir", str(CACHE_DIR))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def pytest_sessionfinish(session):
  if _OWNER:  # the controller (or a run without xdist), after every worker
    shutil.rmtree(CACHE_DIR, ignore_errors=True)


# The longest files first (measured): with --no-loadscope-reorder (pyproject's addopts) pytest-xdist's loadfile hands
# files out in collection order, so these start at once on the two workers while the short files fill in around
# them (its default order, most tests first, left test_presets_fit.py's 11 minutes for the end).
LONGEST_FIRST = ["test_presets_fit.py", "test_tpu_compile.py", "test_decode.py", "test_step.py", "test_faults.py",
                 "test_lm_eval.py"]


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
