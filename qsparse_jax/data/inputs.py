"""A run's input by data.format: its training batches, its fixed validation batches and what the loss reads.

"text": documents packed by concatenation (text.lm_batches), each batch tokens [B, T+1] for training.step.lm_loss.
"instructions": conversations packed without crossing (instructions.sft_batches), each batch a dict of [B, T+1] arrays
for training.step.response_loss.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Callable

from qsparse_jax.data import chat, instructions, text
from qsparse_jax.data.config import DataConfig
from qsparse_jax.data.tokenizers import Tokenizer


@dataclasses.dataclass
class Inputs:
  train: Any  # a Grain IterDataset of this process's rows of every batch; iterate it, save its iterator's state
  validation: list  # the first eval_batches validation batches, already selected: the same text at every evaluation
  select: Callable  # a training batch as the pipeline yields it -> what the loss takes
  summary: str  # for the run's log
  sample_prompt: str  # the start of the first validation document, or its first user message (instructions)


def _opening(text_: str, max_chars: int = 40) -> str:
  """The first line of a document, at most max_chars long, cut after a space when it must be cut."""
  line = text_.lstrip().split("\n", 1)[0]
  if len(line) <= max_chars:
    return line
  cut = line.rfind(" ", 0, max_chars)
  return line[: cut + 1] if cut > 0 else line[:max_chars]


def make_inputs(dc: DataConfig, tokenizer: Tokenizer, *, batch_size: int, eval_batches: int, seed: int,
                process_index: int = 0, process_count: int = 1) -> Inputs:
  """The input of a run for data config dc, with batch_size rows per process (this process's share).

  Raises ValueError when a split is too small for one row (text) or one batch of validation (instructions).
  """
  shard = dict(process_index=process_index, process_count=process_count)
  if dc.format == "instructions":
    template = chat.get_template(dc.chat_template)
    sources = {split: instructions.instruction_source(dc, split) for split in ("train", "validation")}
    make = lambda split, **kw: instructions.sft_batches(sources[split], tokenizer, template, seq_len=dc.seq_len,  # noqa
                                                    batch_size=batch_size, **shard, **kw)
    select = lambda batch: batch  # noqa: E731
    unit = "conversations"
  else:
    sources = {split: text.text_source(dc, split) for split in ("train", "validation")}
    rows_needed = dc.seq_len + 1
    for name, source in sources.items():
      if text.count_tokens(source, tokenizer, dc.tfds_text_key, limit=rows_needed) <= rows_needed:
        raise ValueError(f"data.seq_len={dc.seq_len} is longer than the whole {name} split of the corpus; "
                         "use a shorter data.seq_len or more text")
    make = lambda split, **kw: text.lm_batches(sources[split], tokenizer, seq_len=dc.seq_len,  # noqa: E731
                                                   batch_size=batch_size, text_key=dc.tfds_text_key, **shard, **kw)
    select = operator.itemgetter("tokens")
    unit = "documents"
  # In order; text repeats its validation split to fill eval_batches, instructions are not repeated.
  held_out = make("validation", seed=0, shuffle=False, repeat=dc.format == "text")
  validation = [select(b) for _, b in zip(range(eval_batches), iter(held_out))]
  if not validation:
    raise ValueError(f"the validation split ({len(sources['validation'])} {unit}) fills less than one batch of "
                     f"{batch_size} rows of {dc.seq_len + 1} tokens per process; raise data.validation_fraction or "
                     "lower train.batch_size")
  summary = (f"{dc.source} {dc.format} ({len(sources['train'])} train / {len(sources['validation'])} validation "
             f"{unit}{', chat template ' + dc.chat_template if dc.format == 'instructions' else ''})")
  first = sources["validation"][0]
  if dc.format == "instructions":
    prompt = next((m["content"] for m in instructions.record_messages(first) if m["role"] == "user"), "")
  else:
    document = first[dc.tfds_text_key]
    prompt = _opening(document.decode("utf-8", "replace") if isinstance(document, bytes) else document)
  return Inputs(train=make("train", seed=seed), validation=validation, select=select, summary=summary,
                sample_prompt=prompt)
