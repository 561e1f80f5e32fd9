"""Orbax checkpoints of a training run: model and optimizer state, step, data-iterator state and the run's config.

The train state is stored as a flat {path: array} dict (paths such as "params/blocks/0/attn/q_proj/kernel"), so any
pytree (nnx.State, optax states) round-trips, restores go into an abstract target (shapes, dtypes and shardings
from `jax.eval_shape`), and a checkpoint written by a different model is caught by comparing names and shapes before
any array is read. Saves are asynchronous and atomic (Orbax writes to a temporary folder and renames it), so an
interrupted or failed save leaves the previous checkpoint readable.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import sys
import tempfile
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
  """A checkpoint that does not fit the model or config it is restored into."""


class CheckpointSaveError(OSError):
  """A save that could not be written (full disk, quota, permissions); earlier checkpoints are untouched."""


def _key_str(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _path_str(path) -> str:
  return "/".join(_key_str(k) for k in path)


def flatten(tree) -> dict[str, Any]:
  """{"a/b/0/c": leaf} for every leaf of a pytree."""
  return {_path_str(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten_like(template, flat: dict[str, Any]):
  """The pytree of `template` with its leaves taken from `flat` by path."""
  paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
  return jax.tree_util.tree_unflatten(treedef, [flat[_path_str(path)] for path, _ in paths_leaves])


class Checkpointer:
  """Asynchronous Orbax CheckpointManager keeping the last `keep` checkpoints of a run under `directory`."""

  def __init__(self, directory: str | pathlib.Path, *, keep: int = 3, save_every: int = 1, async_save: bool = True):
    self.directory = pathlib.Path(directory).expanduser().absolute()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
        "state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, *, data_iterator=None, meta: dict | None = None, force: bool = False) -> bool:
    """Start saving (returns once the arrays are copied; the write finishes in the background).

    data_iterator: a Grain iterator whose position is stored per process (process_<i>-of-<n>.json), taken now.
    Skips steps off the save interval unless force.
    """
    items = {"state": ocp.args.StandardSave(flatten(state)), "meta": ocp.args.JsonSave(meta or {})}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def read_meta(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, abstract_state, step: int | None = None):
    """(state, meta) of `step` (default: the latest), restored into `abstract_state`'s structure.

    abstract_state: the train state as jax.ShapeDtypeStruct leaves (with .sharding where the arrays should land, on
    any mesh: Orbax reads each device's slice). Raises CheckpointMismatchError naming the first parameter whose name
    or shape differs.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    stored = self._manager.item_metadata(step)["state"]
    expected = flatten(abstract_state)
    _check_compatible(stored, expected, self.directory / str(step))
    targets = {k: ocp.utils.to_shape_dtype_struct(v) if not isinstance(v, jax.ShapeDtypeStruct) else v
               for k, v in expected.items()}
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(targets), meta=ocp.args.JsonRestore()))
    return unflatten_like(abstract_state, restored["state"]), restored["meta"]

  def restore_data_iterator(self, data_iterator, step: int | None = None) -> str | None:
    """Move data_iterator to its position at `step`; returns None, or why it could not (then it is untouched).

    The position can only be carried over by the same number of processes that wrote it.
    """
    step = self.latest_step() if step is None else step
    folder = self.directory / str(step) / "data"
    mine = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if not (folder / mine).exists():
      written = sorted(p.name for p in folder.glob("process_*.json")) if folder.is_dir() else []
      return (f"the checkpoint holds data positions {written or 'none'}, this run needs {mine}" if written else
              "the checkpoint holds no data position")
    self._manager.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(data_iterator)))
    return None

  def wait(self):
    """Block until pending saves are on disk; a failed one raises CheckpointSaveError."""
    try:
      with _stderr_kept_on_success():
        self._manager.wait_until_finished()
    except Exception as err:  # Orbax/TensorStore report write failures as assorted exception types
      reason = str(err).strip().splitlines()[0].rsplit(": ", 1)[-1]
      steps = self.all_steps()
      kept = f"the checkpoint of step {max(steps)} is intact" if steps else "no earlier checkpoint exists"
      raise CheckpointSaveError(f"saving a checkpoint under {self.directory} failed ({reason}); {kept}") from None

  def close(self):
    try:
      self.wait()
    finally:
      self._manager.close()


@contextlib.contextmanager
def _stderr_kept_on_success():
  """Hold back what is written to file descriptor 2 meanwhile; replay it unless the block raises.

  When a write fails, TensorStore's remaining callbacks print one "Event loop is closed" traceback each from its
  own threads as Orbax tears the save down; the CheckpointSaveError raised instead says what happened, once.
  """
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as held:
    os.dup2(held.fileno(), 2)
    failed = True
    try:
      yield
      failed = False
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      if not failed:
        held.seek(0)
        sys.stderr.write(held.read().decode(errors="replace"))
        sys.stderr.flush()


def _check_compatible(stored: dict, expected: dict, where: pathlib.Path) -> None:
  stored_keys, expected_keys = set(stored), set(expected)
  missing = sorted(expected_keys - stored_keys)
  extra = sorted(stored_keys - expected_keys)
  if missing or extra:
    detail = (f"it lacks {missing[0]!r}" if missing else f"it has {extra[0]!r}, which this model does not")
    raise CheckpointMismatchError(
        f"checkpoint {where} was written by a different model: {detail} "
        f"({len(missing)} missing, {len(extra)} unexpected parameters)")
  for key in sorted(expected_keys):
    got, want = tuple(stored[key].shape), tuple(expected[key].shape)
    if got != want:
      raise CheckpointMismatchError(
          f"checkpoint {where} does not match this model: {key} has shape {got} there, {want} here")


def meta_json(config) -> dict:
  """A JSON-able description of a run's config, stored with every checkpoint."""
  return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def checkpoint_dir(path: str | pathlib.Path) -> pathlib.Path:
  """The checkpoints folder of a run directory (or the folder itself if it holds the numbered checkpoints)."""
  path = pathlib.Path(path).expanduser()
  if not path.is_dir():
    raise FileNotFoundError(f"checkpoint directory {str(path)!r} does not exist")
  for candidate in (path / "checkpoints", path):
    if any(p.name.isdigit() for p in candidate.glob("*") if p.is_dir()):
      return candidate
  raise FileNotFoundError(f"no checkpoint in {str(path)!r} (expected a run directory of `qsparse train`, or its "
                          "checkpoints/ folder)")
