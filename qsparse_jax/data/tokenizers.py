"""Tokenizers: byte-level (default, nothing to download), SentencePiece and Hugging Face tokenizer files.

Each has `name`, `vocab_size`, `eos_id`, `unit` (what one token is, for the loss's unit: "byte" for the byte-level
tokenizer, whose loss is in nats/byte, else "token"), `encode(text) -> ids` (no special tokens added) and
`decode(ids) -> text`; `make_tokenizer(spec)` builds one from a `data.tokenizer` string.
"""

from __future__ import annotations

import pathlib
from typing import Protocol, Sequence


class Tokenizer(Protocol):
  name: str
  vocab_size: int
  eos_id: int
  unit: str

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
  """UTF-8 bytes as tokens 0..255, plus an end-of-document token 256. Vocabulary 257."""

  name = "byte"
  vocab_size = 257
  eos_id = 256
  unit = "byte"

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids: Sequence[int]) -> str:
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
  """A SentencePiece model file (pip install sentencepiece)."""

  unit = "token"

  def __init__(self, path: str):
    import sentencepiece  # optional dependency

    self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
    self.name = f"sentencepiece:{pathlib.Path(path).name}"
    self.vocab_size = self._sp.get_piece_size()
    self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else 0

  def encode(self, text):
    return self._sp.encode(text)

  def decode(self, ids):
    return self._sp.decode([int(i) for i in ids])


class HFTokenizer:
  """A Hugging Face tokenizer.json file (pip install tokenizers)."""

  unit = "token"

  def __init__(self, path: str):
    import tokenizers  # optional dependency

    self._tok = tokenizers.Tokenizer.from_file(path)
    self.name = f"hf:{pathlib.Path(path).name}"
    self.vocab_size = self._tok.get_vocab_size()
    eos = next((t for t in ("</s>", "<|endoftext|>", "<eos>") if self._tok.token_to_id(t) is not None), None)
    self.eos_id = self._tok.token_to_id(eos) if eos else 0

  def encode(self, text):  # no special tokens added (no BOS), like the other tokenizers; callers add EOS
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids):
    return self._tok.decode([int(i) for i in ids])


def make_tokenizer(spec: str) -> Tokenizer:
  """"byte", "sentencepiece:/path/to/model" or "hf:/path/to/tokenizer.json"."""
  kind, _, path = spec.partition(":")
  if kind == "byte" and not path:
    return ByteTokenizer()
  if kind in ("sentencepiece", "hf"):
    if not path or not pathlib.Path(path).expanduser().is_file():
      raise FileNotFoundError(f"data.tokenizer={spec!r}: tokenizer file {path!r} does not exist")
    path = str(pathlib.Path(path).expanduser())
    return SentencePieceTokenizer(path) if kind == "sentencepiece" else HFTokenizer(path)
  raise ValueError(f"data.tokenizer must be 'byte', 'sentencepiece:PATH' or 'hf:PATH', got {spec!r}")


def unit_of(spec: str) -> str:
  """The unit of one token of the tokenizer `spec` names, without loading it: "byte" or "token"."""
  return "byte" if spec == "byte" else "token"
