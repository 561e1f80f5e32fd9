"""Orbax checkpoints of a training run: model and optimizer state, step, data-iterator state and the run's config.

The train state is stored as a flat {path: array} dict (paths such as "params/blocks/0/attn/q_proj/kernel"), so any
pytree (nnx.State, optax states) round-trips, restores go into an abstract target (shapes, dtypes and shardings
from `jax.eval_shape`), and a checkpoint written by a different model is caught by comparing names and shapes before
any array is read. Saves are asynchronous and atomic (Orbax writes to a temporary folder and renames it), so an
interrupted or failed save leaves the previous checkpoint readable. Restores are verified: a checkpoint whose files
cannot be read back (truncated, overwritten, missing) is named with its step and file, and `restore_newest` falls back
to the newest one that restores.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import re
import sys
import tempfile
import threading
import warnings
from typing import Any, Callable

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils


class CheckpointMismatchError(ValueError):
  """A checkpoint that does not fit the model or config it is restored into."""


class CheckpointSaveError(OSError):
  """A save that could not be written (full disk, quota, permissions); earlier checkpoints are untouched."""


class CheckpointRestoreError(ValueError):
  """A checkpoint that exists but cannot be read back: a file truncated, overwritten or missing."""


class CheckpointWarning(UserWarning):
  """A checkpoint passed over for an older one, or moved aside."""


@dataclasses.dataclass
class Restored:
  """What restore_newest read: the state, the run's config as JSON and the step; data_note says why the data
  position was not restored, when one was asked for and it was not."""

  state: Any
  meta: dict
  step: int
  data_note: str | None = None


def _save_reason(err: BaseException) -> str:
  """What failed in an Orbax / TensorStore save error, short: the last ": " part of its first line, without the
  payloads TensorStore may attach (a [tensorstore_spec='{...}'] of the whole array spec) other than the OS error code."""
  last = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
  last = re.sub(r"\s*\[(?!os_error_code)\w+='(?:[^'\\]|\\.)*'\]", "", last)
  return last.rsplit(": ", 1)[-1]


def _reason(err: BaseException) -> str:
  """One line saying what failed in an Orbax / TensorStore restore error: the array and file when it names them."""
  chain, seen = [], err
  while seen is not None and len(chain) < 8:
    chain.append(seen)
    seen = seen.__cause__ or seen.__context__
  for e in chain:
    found = re.search(r'([A-Z_]+): Error reading "([^"]+)" in OCDBT database at local file "([^"]+)": ([^\n;]+)', str(e))
    if found:
      code, key, folder, what = found.groups()
      return f"reading {key} from {folder.rstrip('/')} failed: {what.strip()} ({code})"
  for e in chain:
    if isinstance(e, json.JSONDecodeError):
      return f"invalid JSON ({e.msg} at line {e.lineno} column {e.colno})"
  text = str(chain[-1]).strip().splitlines()
  return f"{type(chain[-1]).__name__}: {text[0] if text else 'no message'}"[:300]


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

  def __init__(self, directory: str | pathlib.Path, *, keep: int = 3, save_every: int = 1, async_save: bool = True,
               read_only: bool = False):
    self.directory = pathlib.Path(directory).expanduser().absolute()
    self.read_only = read_only
    # In place before any read can fail: once one does, the others' reports start at once, on their own threads,
    # and may outlast the hold on stderr.
    _silence_abandoned_reads()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every, create=not read_only,
                                           read_only=read_only, enable_async_checkpointing=async_save)
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
    """The run's config as stored with `step` (default: the latest); CheckpointRestoreError if it cannot be read."""
    step = self._step(step)
    try:
      with _stderr_kept_on_success():
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as err:  # noqa: BLE001 (Orbax raises assorted types for unreadable files)
      raise CheckpointRestoreError(f"checkpoint {self.directory / str(step)}: its config "
                                   f"{self.directory / str(step) / 'meta' / 'metadata'} cannot be read "
                                   f"({_reason(err)})") from err

  def _step(self, step: int | None) -> int:
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    if step not in self.all_steps():
      raise FileNotFoundError(f"no checkpoint of step {step} in {self.directory} (it has steps "
                              f"{', '.join(map(str, self.all_steps()))})")
    return step

  def restore(self, abstract_state, step: int | None = None):
    """(state, meta) of `step` (default: the latest), restored into `abstract_state`'s structure.

    abstract_state: the train state as jax.ShapeDtypeStruct leaves (with .sharding where the arrays should land, on
    any mesh: Orbax reads each device's slice). Raises CheckpointMismatchError naming the first parameter whose name
    or shape differs, and CheckpointRestoreError naming the step and file when the checkpoint cannot be read back.
    """
    step = self._step(step)
    where = self.directory / str(step)
    try:
      with _stderr_kept_on_success():
        stored = self._manager.item_metadata(step)["state"]
    except Exception as err:  # noqa: BLE001
      raise CheckpointRestoreError(f"checkpoint {where}: its state {where / 'state'} is missing or unreadable "
                                   f"({_reason(err)})") from err
    if stored is None:
      raise CheckpointRestoreError(f"checkpoint {where}: its state {where / 'state'} is missing")
    expected = flatten(abstract_state)
    _check_compatible(stored, expected, where)
    targets = {k: ocp.utils.to_shape_dtype_struct(v) if not isinstance(v, jax.ShapeDtypeStruct) else v
               for k, v in expected.items()}
    try:
      with _stderr_kept_on_success():
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(targets), meta=ocp.args.JsonRestore()))
    except Exception as err:  # noqa: BLE001
      raise CheckpointRestoreError(f"checkpoint {where} cannot be restored: {_reason(err)}") from err
    return unflatten_like(abstract_state, restored["state"]), restored["meta"]

  def restore_data_iterator(self, data_iterator, step: int | None = None) -> str | None:
    """Move data_iterator to its position at `step`; returns None, or why it could not (then it is untouched).

    The position can only be carried over by the same number of processes that wrote it. Raises
    CheckpointRestoreError when the stored position cannot be read.
    """
    step = self._step(step)
    folder = self.directory / str(step) / "data"
    mine = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if not (folder / mine).exists():
      written = sorted(p.name for p in folder.glob("process_*.json")) if folder.is_dir() else []
      return (f"the checkpoint holds data positions {written or 'none'}, this run needs {mine}" if written else
              "the checkpoint holds no data position")
    try:
      with _stderr_kept_on_success():
        self._manager.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(data_iterator)))
    except Exception as err:  # noqa: BLE001
      raise CheckpointRestoreError(f"checkpoint {self.directory / str(step)}: its data position {folder / mine} "
                                   f"cannot be read ({_reason(err)})") from err
    return None

  def restore_newest(self, abstract_state: Any | Callable[[dict], Any], *, step: int | None = None,
                     check_meta: Callable[[dict], bool] | None = None, data_iterator=None,
                     move_damaged: bool = False) -> Restored:
    """The newest checkpoint that restores, or exactly `step` when given.

    abstract_state: the abstract train state, or a function of the stored config (JSON) that builds it.
    check_meta(meta): raises when the checkpoint belongs to another run (CheckpointMismatchError: no fallback then);
      returns whether to restore the data position too (when it says no, it has said why).
    data_iterator: restored to the checkpoint's position (unless check_meta said no).
    A checkpoint that cannot be read is reported as a CheckpointWarning naming its step and the file, and the next
    older one is tried; move_damaged (training), once one restores, renames each damaged folder to <step>.damaged,
    kept for inspection but out of the way of the saves to come. Raises CheckpointRestoreError when none restores,
    leaving every folder as it was.
    With several processes, a step counts as restored only when it restored in every process.
    """
    steps = [self._step(step)] if step is not None else sorted(self.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    failures, damaged = [], []
    for i, candidate in enumerate(steps):
      try:
        meta = self.read_meta(candidate)
        restore_data = check_meta(meta) if check_meta is not None else True
        abstract = abstract_state(meta) if callable(abstract_state) else abstract_state
        state, _ = self.restore(abstract, candidate)
        note = None
        if data_iterator is not None:
          note = self.restore_data_iterator(data_iterator, candidate) if restore_data else None
        error = None
      except CheckpointRestoreError as err:
        if step is not None:  # exactly this checkpoint was asked for
          raise
        error = str(err)
      if not _everywhere(error is None):
        error = error or "another process could not restore it"
        failures.append(f"step {candidate}: {error}")
        damaged.append(candidate)
        later = f"; trying step {steps[i + 1]}" if i + 1 < len(steps) else ""
        warnings.warn(f"{error}{later}", CheckpointWarning, stacklevel=2)
        continue
      if move_damaged:  # only once an older checkpoint restored: a run none of whose checkpoints restore keeps all
        for bad in damaged:
          warnings.warn(f"checkpoint {self.directory / str(bad)} moved to {self._move_aside(bad)}",
                        CheckpointWarning, stacklevel=2)
      return Restored(state=state, meta=meta, step=candidate, data_note=note)
    raise CheckpointRestoreError(f"no checkpoint in {self.directory} can be restored ({len(failures)} tried: "
                                 f"{'; '.join(failures)})")

  def _move_aside(self, step: int) -> pathlib.Path:
    """Rename the folder of a damaged checkpoint to <step>.damaged (process 0; every process waits for it)."""
    target, n = self.directory / f"{step}.damaged", 1
    while target.exists():
      n += 1
      target = self.directory / f"{step}.damaged-{n}"
    if jax.process_index() == 0:
      (self.directory / str(step)).rename(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"qsparse_jax: checkpoint {step} moved aside")
    self._manager.reload()
    return target

  def wait(self):
    """Block until pending saves are on disk; a failed one raises CheckpointSaveError."""
    try:
      with _stderr_kept_on_success():
        self._manager.wait_until_finished()
    except Exception as err:  # Orbax/TensorStore report write failures as assorted exception types
      reason = _save_reason(err)
      steps = self.all_steps()
      kept = f"the checkpoint of step {max(steps)} is intact" if steps else "no earlier checkpoint exists"
      raise CheckpointSaveError(f"saving a checkpoint under {self.directory} failed ({reason}); {kept}") from None

  def close(self):
    try:
      self.wait()
    except CheckpointSaveError:
      # The failed save's threads are still being torn down, each printing a traceback for the one failure the
      # error names: hold those back too.
      try:
        with _stderr_kept_on_success(replay=False):
          self._manager.close()
      except Exception:  # noqa: BLE001 (the save error says what failed)
        pass
      raise
    self._manager.close()


_ABANDONED_READ_ERRORS = ("Event loop is closed", "Encountered error while reading array index")


def _silence_abandoned_reads() -> None:
  """After a failed restore, TensorStore keeps finishing the other reads of that restore on its own threads and
  reports each to Orbax's event loop, closed by then: a traceback apiece ("Event loop is closed", "Encountered error
  while reading array index"), printed through sys.excepthook, threading.excepthook, sys.unraisablehook or asyncio's
  logger, for a failure already reported once. From the first Checkpointer on, those drop exactly these; anything
  else passes through. Installed before any read, not after one fails: a report that starts before the error
  reaches the caller would otherwise be printed half held back, half not."""
  if getattr(sys.excepthook, "_qsparse_filter", False):
    return

  def abandoned(exc) -> bool:
    return exc is not None and any(text in str(exc) for text in _ABANDONED_READ_ERRORS)

  def log_filter(record: logging.LogRecord) -> bool:
    return not (record.exc_info and abandoned(record.exc_info[1]))

  logging.getLogger("asyncio").addFilter(log_filter)
  previous_except, previous_unraisable, previous_thread = sys.excepthook, sys.unraisablehook, threading.excepthook

  def excepthook(kind, value, traceback):
    if not abandoned(value):
      previous_except(kind, value, traceback)

  def unraisablehook(unraisable):
    if not abandoned(unraisable.exc_value):
      previous_unraisable(unraisable)

  def thread_excepthook(args):
    if not abandoned(args.exc_value):
      previous_thread(args)

  excepthook._qsparse_filter = True
  sys.excepthook, sys.unraisablehook, threading.excepthook = excepthook, unraisablehook, thread_excepthook


def _everywhere(ok: bool) -> bool:
  """Whether ok holds in every process (an all-gather when there are several)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


@contextlib.contextmanager
def _stderr_kept_on_success(replay: bool = True):
  """Hold back what is written to file descriptor 2 meanwhile; replay it unless the block raises (or replay=False).

  When a write (or a read) fails, TensorStore's remaining callbacks print one "Event loop is closed" traceback each
  from their own threads as Orbax tears the operation down; the error raised instead says what happened, once.
  The held file may be on the disk the failed save filled: what it cannot take is dropped, and file descriptor 2 is
  given back whatever happens.
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
      try:
        sys.stderr.flush()
      except OSError:
        pass
      os.dup2(saved, 2)
      os.close(saved)
      if replay and not failed:
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
