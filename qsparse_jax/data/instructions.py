"""Instruction data for supervised fine-tuning: TFDS builders and the packed Grain pipeline (method.md §7).

- `InstructionFiles`: a TFDS builder that turns JSONL files of instruction records (any format chat.conversation
  reads) into an array_record dataset of normalized conversations, with train and validation splits (a record goes to
  validation when the hash of its conversation falls in the first `validation_fraction`; stable as files grow).
- `python_stdlib_instructions`: a small instruction set built from real text every Python installation has: for each
  documented function of the standard library, "write the function that <its docstring's summary>" answered by the
  function's source (without its docstring).
- `instruction_source`: the random-access source of a split (JSONL files, the standard library set, or a TFDS
  instruction dataset by name).
- `sft_batches`: shard, shuffle, render each conversation with a chat template (chat.encode), truncate to the row
  length, pack several conversations into each row (first-fit), batch. Every row carries segment ids (1, 2, ... per
  conversation, 0 for padding) and positions that restart at each conversation, so attention does not cross
  examples, and a loss mask that is 1 on response tokens only.
"""

from __future__ import annotations

import ast
import hashlib
import json
import pathlib
import textwrap
from typing import Iterator, Sequence

import grain
import tensorflow_datasets as tfds

from qsparse_jax.data import chat, text
from qsparse_jax.data.config import DataConfig
from qsparse_jax.data.tokenizers import Tokenizer


def _in_validation(key: str, validation_fraction: float) -> bool:
  return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 2**32 < validation_fraction


def read_jsonl(path: pathlib.Path) -> Iterator[tuple[str, list[dict[str, str]]]]:
  """(file:line, conversation) for every non-blank line of a JSONL file; a bad line raises naming file and line."""
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{number}"
      try:
        record = json.loads(line)
      except json.JSONDecodeError as err:
        raise chat.RecordError(f"{where} is not valid JSON ({err.msg}); expected one instruction record per line") \
            from None
      if not isinstance(record, dict):
        raise chat.RecordError(f"{where} holds a {type(record).__name__}; expected a JSON object per line")
      try:
        yield where, chat.conversation(record)
      except chat.RecordError as err:
        raise chat.RecordError(f"{where}: {err}") from None


def _source_without_docstring(lines: Sequence[str], node: ast.FunctionDef) -> str | None:
  """The function's source lines (from its `def`), dedented, without its docstring; None when the docstring is its
  only statement or the `def` does not start its line."""
  if len(node.body) < 2 or not lines[node.lineno - 1].lstrip().startswith("def "):
    return None
  doc = node.body[0]
  kept = lines[node.lineno - 1:doc.lineno - 1] + lines[doc.end_lineno:node.end_lineno]
  return textwrap.dedent("\n".join(kept))


def python_stdlib_instructions(max_chars: int = 320, max_summary_chars: int = 160) -> Iterator[tuple[str, dict[str, str]]]:
  """(key, {"prompt", "response"}) for the documented functions and methods of Python's standard library modules
  (text.python_stdlib_files) whose source without the docstring has at most max_chars characters and whose
  docstring summary at most max_summary_chars.

  Prompt: "Write the Python function `<name>`: <the docstring's first paragraph>"; response: the source.
  """
  for path in text.python_stdlib_files():
    source = path.read_text(encoding="utf-8", errors="replace")
    try:
      tree = ast.parse(source)
    except SyntaxError:
      continue
    lines = source.splitlines()
    for node in ast.walk(tree):
      if not isinstance(node, ast.FunctionDef) or not (doc := ast.get_docstring(node)):
        continue
      summary = " ".join(doc.strip().split("\n\n")[0].split())
      code = _source_without_docstring(lines, node)
      if code is None or len(code) > max_chars or not 0 < len(summary) <= max_summary_chars:
        continue
      yield f"{path.stem}:{node.lineno}", {"prompt": f"Write the Python function `{node.name}`: {summary}",
                                           "response": code}


class InstructionFiles(tfds.core.GeneratorBasedBuilder):
  """JSONL instruction files (or the standard library set) as a TFDS dataset (array_record) with "train" and
  "validation" splits of {"messages": the conversation as JSON text}."""

  VERSION = tfds.core.Version("1.0.0")

  def __init__(self, *, files: Sequence[pathlib.Path] | None, validation_fraction: float, **kwargs):
    """files: JSONL files; None for python_stdlib_instructions."""
    self._files = None if files is None else sorted(pathlib.Path(f) for f in files)
    self._validation_fraction = validation_fraction
    stamp = ([[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in self._files] if self._files is not None
             else [str(p) for p in text.python_stdlib_files()])
    digest = hashlib.sha256(json.dumps([validation_fraction, stamp]).encode()).hexdigest()[:12]
    corpus = "jsonl" if files is not None else "python_stdlib"
    super().__init__(config=tfds.core.BuilderConfig(name=f"{corpus}_{digest}"), file_format="array_record",
                     **kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"messages": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager
    conversations = list(self._conversations())
    if not conversations:
      raise ValueError(f"data.paths: no instruction records in {', '.join(map(str, self._files or []))}")
    return {name: self._generate_examples(conversations, part) for part, name in enumerate(("train", "validation"))}

  def _conversations(self):
    if self._files is None:
      for key, record in python_stdlib_instructions():
        yield key, chat.conversation(record)
    else:
      for path in self._files:
        yield from read_jsonl(path)

  def _generate_examples(self, conversations, part: int):
    for key, messages in conversations:
      messages_json = json.dumps(messages, ensure_ascii=False)
      if _in_validation(messages_json, self._validation_fraction) == bool(part):
        yield key, {"messages": messages_json}


def instruction_source(cfg: DataConfig, split: str):
  """Random-access source of instruction records for split "train" or "validation"; builds the dataset if needed.

  data.source "files": JSONL files (or folders of them) in data.paths; "python_stdlib": python_stdlib_instructions;
  "tfds": a TFDS dataset by name whose records are in one of chat.RECORD_FORMATS.
  """
  data_dir = str(pathlib.Path(cfg.data_dir).expanduser())
  if cfg.source == "tfds":
    return text.tfds_split_source(cfg, split)
  if cfg.source == "python_stdlib":
    files = None
  elif cfg.source == "files":
    files = text.expand_paths(cfg.paths)
  else:
    raise ValueError(f"data.source must be 'python_stdlib', 'files' or 'tfds', got {cfg.source!r}")
  builder = InstructionFiles(files=files, validation_fraction=cfg.validation_fraction, data_dir=data_dir)
  text.prepare(builder, local=True, download_config=tfds.download.DownloadConfig(verify_ssl=False))
  return builder.as_data_source(split=split)


def record_messages(record) -> list[dict]:
  """The conversation of a source record: InstructionFiles stores it as JSON text, a TFDS dataset in any of
  chat.RECORD_FORMATS."""
  messages = record.get("messages")
  if isinstance(messages, (bytes, str)):
    return json.loads(messages)
  return chat.conversation(record)


class _Encode(grain.transforms.Map):
  """A record -> {"tokens", "loss_mask"} [≤ max_len] int32 (chat.encode), truncated to max_len."""

  def __init__(self, tokenizer: Tokenizer, template: chat.ChatTemplate, max_len: int):
    self._tokenizer, self._template, self._max_len = tokenizer, template, max_len

  def map(self, record):
    tokens, mask = chat.encode(record_messages(record), self._template, self._tokenizer)
    return {"tokens": tokens[: self._max_len], "loss_mask": mask[: self._max_len]}


def sft_batches(source, tokenizer: Tokenizer, template: chat.ChatTemplate, *, seq_len: int,
                batch_size: int, seed: int, shuffle: bool = True, repeat: bool = True, process_index: int = 0,
                process_count: int = 1):
  """A Grain IterDataset of packed instruction batches, each a dict of int32 [batch_size, seq_len + 1] arrays:

    tokens       the rendered conversations, several per row, then padding (0)
    loss_mask    1 on the tokens the model is trained to produce (chat.encode), 0 elsewhere
    segment_ids  1, 2, ... for the conversations of a row, 0 for padding
    positions    0, 1, ... within each conversation

  A conversation longer than seq_len + 1 tokens is cut to that length; one with no response token left is dropped.
  Rows are filled first-fit from batch_size open rows at a time. Each process reads its own shard of the records
  (process_index::process_count). The iterator's get_state()/set_state() resume it.
  """
  row = seq_len + 1
  ds = grain.MapDataset.source(source)
  if process_count > 1:
    ds = ds[process_index::process_count]
  if len(ds) == 0:
    raise ValueError(f"instruction shard {process_index} of {process_count} has no records: the split has "
                     f"{len(source)}")
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if repeat:
    ds = ds.repeat(None)
  ds = ds.map(_Encode(tokenizer, template, row)).filter(lambda ex: ex["loss_mask"].any())
  packed = grain.experimental.FirstFitPackIterDataset(
      ds.to_iter_dataset(), length_struct={"tokens": row, "loss_mask": row}, num_packing_bins=batch_size, seed=seed,
      shuffle_bins=shuffle)
  packed = packed.map(lambda ex: {"tokens": ex["tokens"], "loss_mask": ex["loss_mask"],
                                  "segment_ids": ex["tokens_segment_ids"], "positions": ex["tokens_positions"]})
  return packed.batch(batch_size, drop_remainder=True)
