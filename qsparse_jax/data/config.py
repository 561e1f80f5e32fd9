"""DataConfig: where the text of a run comes from and how it becomes token sequences (the `data.*` fields)."""

from __future__ import annotations

import dataclasses
from typing import Literal


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the text comes from and how it becomes token sequences.

  format: "text" (documents for language-model pretraining, packed by concatenation) or "instructions" (instruction
    records for supervised fine-tuning: loss on response tokens only, conversations packed without attention
    across them; qsparse_jax.data.instructions).
  source: "python_stdlib" (the source files of Python's standard library on this machine: a code corpus every
    Python installation has; with format "instructions", its documented functions as instruction/response pairs),
    "files" (text files or folders in `paths`; JSONL files of instruction records with format "instructions"), or
    "tfds" (a TFDS dataset by name).
  """

  format: Literal["text", "instructions"] = "text"

  source: Literal["python_stdlib", "files", "tfds"] = "python_stdlib"
  paths: tuple[str, ...] = ()
  tfds_name: str = "tiny_shakespeare"
  tfds_text_key: str = "text"
  data_dir: str = "~/.cache/qsparse_jax/tfds"  # where built datasets are cached
  validation_fraction: float = 0.05
  tokenizer: str = "byte"  # "byte", "sentencepiece:/path/model.model" or "hf:/path/tokenizer.json"
  seq_len: int = 256
  shuffle_seed: int = 0
  chat_template: str = "chatml"  # format "instructions": qsparse_jax.data.chat.TEMPLATES ("chatml", "mistral", "plain")

  def __post_init__(self):
    if not 0.0 < self.validation_fraction < 1.0:
      raise ValueError(f"data.validation_fraction must be in (0, 1), got {self.validation_fraction}")
    if self.seq_len < 2:
      raise ValueError(f"data.seq_len must be at least 2, got {self.seq_len}")
    if self.format not in ("text", "instructions"):
      raise ValueError(f"data.format must be 'text' or 'instructions', got {self.format!r}")
    if self.chat_template not in ("chatml", "mistral", "plain"):
      raise ValueError(f"data.chat_template must be 'chatml', 'mistral' or 'plain', got {self.chat_template!r}")
    if self.source == "files" and not self.paths:
      raise ValueError("data.paths must name at least one text file or folder when data.source='files'")
    if self.paths and self.source != "files":
      raise ValueError(f"data.paths is read only with data.source='files', and this config has "
                       f"data.source={self.source!r}: set data.source=files, or leave data.paths out")
