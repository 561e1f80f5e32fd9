"""Text data through TensorFlow Datasets and Grain, without TensorFlow.

- `TextFiles`: a TFDS builder that turns local text files into an array_record dataset with train and validation
  splits (the last `validation_fraction` of every file, cut at a line boundary, is validation).
- `text_source`: the random-access source of a split, built from local files, from Python's standard library (a code
  corpus present on every machine with Python), or from any TFDS text dataset by name.
- `lm_batches`: a Grain pipeline: per-process shard, shuffle, tokenize, pack documents into fixed-length sequences
  (concatenate, then split), batch. Its iterator's state (`get_state` / `set_state`) is saved with checkpoints.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import pathlib
import shutil
import sysconfig
import warnings
from typing import Iterable, Sequence

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from jax.experimental import multihost_utils

from qsparse_jax.data.config import DataConfig
from qsparse_jax.data.tokenizers import Tokenizer

# ---------------------------------------------------------------------------------------------- TFDS: local files


def _line_cut(text: str, at: int) -> int:
  """The index of the first line start at or after `at` (or len(text))."""
  if at <= 0:
    return 0
  newline = text.find("\n", at - 1)
  return len(text) if newline < 0 else newline + 1


def split_text(text: str, validation_fraction: float) -> tuple[str, str]:
  """(train, validation) parts of one file: validation is its last fraction, starting at a line boundary (or, in a
  file whose last fraction holds no line start, such as a file of one line, at the exact character)."""
  at = int(round(len(text) * (1.0 - validation_fraction)))
  cut = _line_cut(text, at)
  if cut == len(text):
    cut = at
  return text[:cut], text[cut:]


class DataWarning(UserWarning):
  """Text that is legal but suspicious: binary bytes, or bytes that are not UTF-8."""


def read_text_file(path: pathlib.Path) -> str:
  """A corpus file as text: UTF-8, invalid bytes replaced by U+FFFD, with a DataWarning for a file that looks binary
  (NUL bytes) or is not UTF-8 (Latin-1, say)."""
  data = path.read_bytes()
  if b"\x00" in data:
    warnings.warn(f"data.paths: {path} holds NUL bytes: it looks binary, not text (training on it anyway)",
                  DataWarning, stacklevel=2)
    return data.decode("utf-8", errors="replace")
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as err:
    text = data.decode("utf-8", errors="replace")
    warnings.warn(f"data.paths: {path} is not UTF-8 (byte {err.start} is {data[err.start]:#04x}); "
                  f"{text.count(chr(0xFFFD))} characters became U+FFFD: convert it first, e.g. "
                  f"iconv -f latin1 -t utf-8", DataWarning, stacklevel=2)
    return text


def _chunks(text: str, chunk_chars: int) -> Iterable[str]:
  start = 0
  while start < len(text):
    end = _line_cut(text, start + chunk_chars) if start + chunk_chars < len(text) else len(text)
    yield text[start:end]
    start = end


class TextFiles(tfds.core.GeneratorBasedBuilder):
  """Local text files as a TFDS dataset (array_record) with "train" and "validation" splits of {"text": str}.

  Every file contributes its first (1 − validation_fraction) to train and the rest to validation, in chunks of at
  most `chunk_chars` characters cut at line boundaries (one chunk is one document).
  """

  VERSION = tfds.core.Version("1.0.0")

  def __init__(self, *, corpus: str, files: Sequence[pathlib.Path], validation_fraction: float,
               chunk_chars: int = 1 << 16, **kwargs):
    self._files = sorted(pathlib.Path(f) for f in files)
    self._validation_fraction = validation_fraction
    self._chunk_chars = chunk_chars
    digest = hashlib.sha256(json.dumps(
        [validation_fraction, chunk_chars] + [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in self._files]
    ).encode()).hexdigest()[:12]
    super().__init__(config=tfds.core.BuilderConfig(name=f"{corpus}_{digest}"), file_format="array_record",
                     **kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(0), "validation": self._generate_examples(1)}

  def _generate_examples(self, part: int):
    count = 0
    for file_index, path in enumerate(self._files):
      text = read_text_file(path) if part == 0 else path.read_text(encoding="utf-8", errors="replace")
      for chunk_index, chunk in enumerate(_chunks(split_text(text, self._validation_fraction)[part],
                                                  self._chunk_chars)):
        count += 1
        yield f"{file_index}-{chunk_index}", {"text": chunk}
    if count == 0:
      chars = sum(p.stat().st_size for p in self._files)
      raise ValueError(f"data.paths: the corpus ({len(self._files)} file(s), {chars} bytes) leaves no text for its "
                       f"{('train', 'validation')[part]} split at data.validation_fraction={self._validation_fraction}"
                       ": give more text")


def python_stdlib_files() -> list[pathlib.Path]:
  """The top-level modules of Python's standard library on this machine (about 4.7 MB of source for 3.11)."""
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  files = sorted(root.glob("*.py"))
  if not files:
    raise FileNotFoundError(f"no Python standard library sources found under {root}")
  return files


def expand_paths(paths: Sequence[str]) -> list[pathlib.Path]:
  files = []
  for raw in paths:
    path = pathlib.Path(raw).expanduser()
    if path.is_dir():
      found = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
      if not found:
        raise FileNotFoundError(f"data.paths: folder {raw!r} holds no files")
      files += found
    elif path.is_file():
      files.append(path)
    else:
      raise FileNotFoundError(f"data.paths: {raw!r} does not exist (expected text files or folders)")
  if sum(f.stat().st_size for f in files) == 0:
    raise ValueError(f"data.paths: {', '.join(map(str, paths))} holds no text (all files are empty)")
  return files


def prepare(builder, *, local: bool = False, **kwargs) -> None:
  """download_and_prepare, by process 0 first when several processes share one data_dir, then by the others
  (which then find it built, or build their own copy on a host-local disk).

  local: a dataset built from local files, whose "Downloading and preparing" banner TFDS prints is not shown. A build
  that fails leaves nothing behind in the cache.
  """
  def build():
    try:
      with contextlib.redirect_stdout(io.StringIO()) if local else contextlib.nullcontext():
        builder.download_and_prepare(**kwargs)
    except BaseException:
      _remove_partial_build(pathlib.Path(builder.data_dir))
      raise

  if jax.process_count() == 1:
    return build()
  if jax.process_index() == 0:
    build()
  multihost_utils.sync_global_devices(f"qsparse_jax: {builder.name} prepared")
  if jax.process_index() != 0:
    build()


def _remove_partial_build(version_dir: pathlib.Path) -> None:
  """Remove what a failed TFDS build left: its version folder, the temporary folders beside it, and the config and
  dataset folders above them if they are left empty."""
  if (version_dir / "dataset_info.json").exists():
    return  # a complete build from before; not ours to remove
  for leftover in [version_dir, *version_dir.parent.glob(f"{version_dir.name}.incomplete*")]:
    shutil.rmtree(leftover, ignore_errors=True)
  for folder in (version_dir.parent, version_dir.parent.parent):
    try:
      folder.rmdir()  # only when empty
    except OSError:
      break


def tfds_split_source(cfg: DataConfig, split: str):
  """The data source of split "train" or "validation" of the TFDS dataset data.tfds_name (built if needed).

  Validation is the dataset's "validation" split, else its "test" split; a dataset with neither gives its last
  validation_fraction of "train" to validation and the rest to train.
  """
  builder = tfds.builder(cfg.tfds_name, data_dir=str(pathlib.Path(cfg.data_dir).expanduser()),
                         file_format="array_record")
  prepare(builder)
  held_out = next((s for s in ("validation", "test") if s in builder.info.splits), None)
  if held_out is None:
    cut = int(round(100 * (1 - cfg.validation_fraction)))
    split_name = f"train[:{cut}%]" if split == "train" else f"train[{cut}%:]"
  else:
    split_name = "train" if split == "train" else held_out
  return builder.as_data_source(split=split_name)


def text_source(cfg: DataConfig, split: str):
  """Random-access source of {"text": ...} records for split "train" or "validation"; builds the dataset if needed."""
  data_dir = str(pathlib.Path(cfg.data_dir).expanduser())
  if cfg.source == "tfds":
    return tfds_split_source(cfg, split)
  if cfg.source == "python_stdlib":
    corpus, files = "python_stdlib", python_stdlib_files()
  elif cfg.source == "files":
    corpus, files = "files", expand_paths(cfg.paths)
  else:
    raise ValueError(f"data.source must be 'python_stdlib', 'files' or 'tfds', got {cfg.source!r}")
  builder = TextFiles(corpus=corpus, files=files, validation_fraction=cfg.validation_fraction, data_dir=data_dir)
  prepare(builder, local=True, download_config=tfds.download.DownloadConfig(verify_ssl=False))
  return builder.as_data_source(split=split)


# -------------------------------------------------------------------------------------------------- Grain pipeline


class _Tokenize(grain.transforms.Map):

  def __init__(self, tokenizer: Tokenizer, text_key: str):
    self._tokenizer, self._text_key = tokenizer, text_key

  def map(self, record):
    text = record[self._text_key]
    if isinstance(text, bytes):
      text = text.decode("utf-8", errors="replace")
    return {"tokens": np.asarray(self._tokenizer.encode(text) + [self._tokenizer.eos_id], np.int32)}


def lm_batches(source, tokenizer: Tokenizer, *, seq_len: int, batch_size: int, seed: int, shuffle: bool = True,
               repeat: bool = True, text_key: str = "text", process_index: int = 0, process_count: int = 1):
  """A Grain IterDataset of {"tokens": int32 [batch_size, seq_len + 1]} packed language-model batches.

  Each process reads its own shard of the documents (process_index::process_count), shuffled by `seed`; documents are
  tokenized, each followed by the end-of-document token, concatenated and split into rows of seq_len + 1 tokens
  (inputs are [:, :-1], targets [:, 1:]). Iterate with `iter(...)`; the iterator's get_state()/set_state() resume it.
  """
  ds = grain.MapDataset.source(source)
  if process_count > 1:
    ds = ds[process_index::process_count]
  if len(ds) == 0:
    raise ValueError(f"data shard {process_index} of {process_count} has no documents: the split has {len(source)}; "
                     "use more (or smaller) documents than processes reading them")
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if repeat:
    ds = ds.repeat(None)
  ds = ds.map(_Tokenize(tokenizer, text_key)).to_iter_dataset()
  ds = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct={"tokens": seq_len + 1})
  ds = ds.map(lambda ex: {"tokens": ex["tokens"]})
  return ds.batch(batch_size, drop_remainder=True)


def count_tokens(source, tokenizer: Tokenizer, text_key: str = "text", limit: int | None = None) -> int:
  """Tokens in a source (documents plus their end tokens); `limit` stops counting once it is passed."""
  total = 0
  for i in range(len(source)):
    text = source[i][text_key]
    total += len(tokenizer.encode(text.decode("utf-8", "replace") if isinstance(text, bytes) else text)) + 1
    if limit is not None and total > limit:
      break
  return total
