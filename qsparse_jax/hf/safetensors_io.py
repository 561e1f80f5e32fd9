"""Reading and writing the safetensors format without loading whole files: memory-mapped tensors, sliced on demand.

A safetensors file is an 8-byte little-endian header length, a JSON header {name: {"dtype", "shape",
"data_offsets": [begin, end]}} (plus an optional "__metadata__" of strings), then the raw little-endian bytes.
Checkpoints split over several files name each tensor's file in model.safetensors.index.json ("weight_map").
Reading goes through numpy memory maps, so a slice of a tensor reads only its own bytes: a host of a sharded
model reads its shards of each tensor and nothing else.
"""

from __future__ import annotations

import json
import os
import pathlib
import struct
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "I64": np.int64,
          "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class SafetensorsError(ValueError):
  """A checkpoint directory or file that is not what a safetensors checkpoint should be."""


def _read_header(path: pathlib.Path) -> tuple[dict, int]:
  with path.open("rb") as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise SafetensorsError(f"{path} is not a safetensors file (shorter than its 8-byte header length)")
    (length,) = struct.unpack("<Q", raw)
    if length > os.path.getsize(path) - 8:
      raise SafetensorsError(f"{path} is truncated: its header says {length} bytes, the file is shorter")
    try:
      header = json.loads(f.read(length))
    except json.JSONDecodeError as err:
      raise SafetensorsError(f"{path} has an unreadable safetensors header: {err}") from None
  header.pop("__metadata__", None)
  return header, 8 + length


class Checkpoint(Mapping[str, np.ndarray]):
  """The tensors of a Hugging Face checkpoint directory (one model.safetensors or an index of shards), by name,
  as read-only memory-mapped numpy arrays: indexing one with a slice reads only those bytes."""

  def __init__(self, directory: str | pathlib.Path):
    self.directory = pathlib.Path(directory)
    index = self.directory / INDEX
    if index.is_file():
      try:
        weight_map = json.loads(index.read_text())["weight_map"]
      except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise SafetensorsError(f"{index} is not a safetensors index (a JSON object with a weight_map): {err}") from None
      files = sorted(set(weight_map.values()))
      outside = [f for f in files if not isinstance(f, str) or pathlib.PurePosixPath(f).name != f]
      if outside:
        raise SafetensorsError(f"{index} names shard {outside[0]!r}, which is not a file name inside "
                               f"{str(self.directory)!r}; shards must sit beside the index")
    elif (self.directory / SINGLE).is_file():
      files = [SINGLE]
    else:
      raise FileNotFoundError(f"no {SINGLE} or {INDEX} in {str(self.directory)!r}")
    missing = [f for f in files if not (self.directory / f).is_file()]
    if missing:
      raise FileNotFoundError(f"missing shard(s) of {str(self.directory)!r}: {', '.join(missing)} (named in {INDEX})")
    self._entries: dict[str, tuple[pathlib.Path, dict, int]] = {}
    for name in files:
      path = self.directory / name
      header, data_start = _read_header(path)
      for tensor, entry in header.items():
        self._entries[tensor] = (path, entry, data_start)

  def __getitem__(self, name: str) -> np.ndarray:
    path, entry, data_start = self._entries[name]
    if entry["dtype"] not in DTYPES:
      raise SafetensorsError(f"tensor {name} in {path.name} has dtype {entry['dtype']}, not one of {sorted(DTYPES)}")
    begin, end = entry["data_offsets"]
    dtype = np.dtype(DTYPES[entry["dtype"]])
    shape = tuple(entry["shape"])
    if end - begin != dtype.itemsize * int(np.prod(shape)):
      raise SafetensorsError(f"tensor {name} in {path.name}: {end - begin} bytes do not hold {shape} {dtype}")
    if not shape or end == begin:
      return np.frombuffer(path.read_bytes()[data_start + begin:data_start + end], dtype).reshape(shape)
    return np.memmap(path, dtype=dtype, mode="r", offset=data_start + begin, shape=shape)

  def __iter__(self) -> Iterator[str]:
    return iter(self._entries)

  def __len__(self) -> int:
    return len(self._entries)

  def info(self, name: str) -> tuple[tuple[int, ...], str]:
    """(shape, safetensors dtype name) of a tensor, without reading it."""
    _, entry, _ = self._entries[name]
    return tuple(entry["shape"]), entry["dtype"]


def save_file(tensors: Mapping[str, np.ndarray], path: str | pathlib.Path, metadata: Mapping[str, str] | None = None):
  """Write tensors (numpy arrays, any DTYPES dtype) to one safetensors file, in name order."""
  header, offset = {}, 0
  arrays = {name: np.ascontiguousarray(tensors[name]) for name in sorted(tensors)}
  for name, array in arrays.items():
    if array.dtype not in NAMES:
      raise SafetensorsError(f"cannot store {name} of dtype {array.dtype} in safetensors")
    header[name] = {"dtype": NAMES[array.dtype], "shape": list(array.shape),
                    "data_offsets": [offset, offset + array.nbytes]}
    offset += array.nbytes
  if metadata:
    header["__metadata__"] = dict(metadata)
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # align the data to 8 bytes, as the reference writer does
  with pathlib.Path(path).open("wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for array in arrays.values():
      f.write(array.tobytes())
