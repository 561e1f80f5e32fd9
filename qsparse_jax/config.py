"""The run config: one frozen dataclass per section (model, data, train, mesh), presets and command-line overrides.

Each section's dataclass lives with the code it configures (nn.model.ModelConfig, data.config.DataConfig,
parallel.sharding.MeshConfig) and is re-exported here with TrainConfig and Config, so a preset needs one import.
A preset (configs/tiny.py) is a Python file that defines `config = Config(...)`; it is executed, so it must be
trusted like any script. Any field can then be overridden as `section.field=value` (e.g. `train.steps=200
model.sparsity_down=0.5`); values are parsed as Python literals.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import pathlib
import types
import typing
from typing import Any, Literal

from qsparse_jax.data.config import DataConfig
from qsparse_jax.nn.model import ModelConfig
from qsparse_jax.parallel.sharding import MeshConfig

__all__ = ["Config", "DataConfig", "MeshConfig", "ModelConfig", "TrainConfig", "apply_overrides", "config_from_json",
           "load_preset", "paper_pretraining", "preset_value"]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation, evaluation, logging and checkpointing (AdamW with warm-up then decay, method.md §7)."""

  steps: int = 1000
  batch_size: int = 32
  learning_rate: float = 3e-3
  end_learning_rate: float = 3e-4
  warmup_steps: int = 100
  decay: Literal["cosine", "polynomial"] = "cosine"
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  clip_norm: float = 1.0
  microbatches: int = 1  # gradient accumulation: the batch runs as this many micro-batches, one after the other
  seed: int = 0
  eval_every: int = 250
  eval_batches: int = 8
  log_every: int = 10
  checkpoint_every: int = 250
  keep_checkpoints: int = 3
  out_dir: str = "runs/tiny"
  sample_tokens: int = 200
  sample_prompt: str = ""  # "": the start of the first validation document (its first user message, for instructions)
  progress: bool = True
  # Start from pretrained weights (continued training, qsparse_jax.training.init_from): "hf:DIR" for a Hugging Face
  # model, or a run directory of qsparse train; "" initializes at random. A run that has its own checkpoint resumes
  # it.
  init_from: str = ""

  def __post_init__(self):
    for name in ("steps", "batch_size", "microbatches", "eval_every", "eval_batches", "log_every", "checkpoint_every",
                 "keep_checkpoints"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"train.{name} must be a positive integer, got {value!r}")
    if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
      raise ValueError(f"train.warmup_steps must be a non-negative integer, got {self.warmup_steps!r}")
    if self.learning_rate <= 0:
      raise ValueError(f"train.learning_rate must be positive, got {self.learning_rate}")
    if self.batch_size % self.microbatches:
      raise ValueError(f"train.batch_size={self.batch_size} must be a multiple of train.microbatches="
                       f"{self.microbatches}")


@dataclasses.dataclass(frozen=True)
class Config:
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  train: TrainConfig = TrainConfig()
  mesh: MeshConfig = MeshConfig()

  def __post_init__(self):
    if self.data.seq_len > self.model.max_seq_len:
      raise ValueError(f"data.seq_len={self.data.seq_len} is longer than model.max_seq_len={self.model.max_seq_len}: "
                       "lower data.seq_len or raise model.max_seq_len")


def config_from_json(stored: dict) -> Config:
  """The Config a checkpoint was written with, from its JSON form (checkpoint.meta_json); lists become tuples.

  Fields this version does not know are refused by name; fields it added since are left at their defaults.
  """
  sections = {}
  for section in dataclasses.fields(Config):
    cls = section.type if isinstance(section.type, type) else type(getattr(Config(), section.name))
    hints = typing.get_type_hints(cls)
    values = dict(stored.get(section.name, {}))
    unknown = sorted(set(values) - set(hints))
    if unknown:
      raise ValueError(f"the checkpoint's config has {section.name}.{unknown[0]}, which this version of qsparse-jax "
                       "does not know")
    if section.name == "data" and values.get("source", "files") != "files":
      values.pop("paths", None)  # written before data.paths required data.source=files, and never read then
    sections[section.name] = cls(**{k: tuple(map(_tuple_if_list, v)) if isinstance(v, list) else v
                                    for k, v in values.items()})
  return Config(**sections)


def _tuple_if_list(v):
  return tuple(v) if isinstance(v, list) else v


def preset_value(path: str | pathlib.Path, name: str, kind: type, *, what: str, example: str):
  """Execute a Python preset file and return its module-level `name`, which must be a `kind`."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{what} file {str(path)!r} does not exist (expected a preset such as {example})")
  spec = importlib.util.spec_from_file_location(f"qsparse_{name}_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  value = getattr(module, name, None)
  if not isinstance(value, kind):
    raise ValueError(f"{path} must define `{name} = {kind.__name__}(...)`, found {type(value).__name__}")
  return value


def load_preset(path: str | pathlib.Path) -> Config:
  """Execute a preset file and return its module-level `config`."""
  return preset_value(path, "config", Config, what="config", example="configs/tiny.py")


def _parse_value(text: str, annotation: Any, where: str) -> Any:
  try:
    value = ast.literal_eval(text)
  except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
    value = text  # bare words are strings
  origin = typing.get_origin(annotation)
  args = typing.get_args(annotation)
  allowed = [a for a in args if a is not type(None)] if origin in (typing.Union, types.UnionType) else [annotation]
  if value is None and len(allowed) < len(args):
    return None
  for kind in allowed:
    kind_origin = typing.get_origin(kind) or kind
    if kind_origin is Literal:
      if value in typing.get_args(kind):
        return value
      continue
    if kind_origin is tuple and isinstance(value, (tuple, list)):
      return tuple(value)
    if kind_origin is tuple and isinstance(value, str):  # a,b,c: comma-separated, no Python quoting needed
      return tuple(part.strip() for part in value.split(",") if part.strip())
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
      return value
    if kind is bool and isinstance(value, bool):
      return value
    if kind is bool and isinstance(value, str) and value.lower() in ("true", "false"):  # as a shell user writes it
      return value.lower() == "true"
    if kind is str and isinstance(value, str):
      return value
  expected = " or ".join(str(a).replace("typing.", "") for a in allowed)
  raise ValueError(f"{where}={text!r} has the wrong type: expected {expected}")


SITES = ("qkv", "out", "up", "down")


def apply_overrides(config: Config, overrides: list[str]) -> Config:
  """Return config with each "section.field=value" applied; unknown names get the closest valid one suggested.

  Two shorthands: `model.sparsity=S` sets the four sites' sparsities (a site's own override wins), and
  `data.paths=...` alone implies `data.source=files`.
  """
  sections = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
  changes: dict[str, dict[str, Any]] = {name: {} for name in sections}
  every_site = None
  for item in overrides:
    key, sep, text = item.partition("=")
    if not sep:
      raise ValueError(f"override {item!r} must look like section.field=value (e.g. train.steps=200)")
    section, dot, field = key.strip().partition(".")
    if key.strip() == "model.sparsity":
      every_site = _parse_value(text.strip(), float, key.strip())
      continue
    if not dot or section not in sections:
      close = difflib.get_close_matches(key, [f"{s}.{f.name}" for s, v in sections.items()
                                               for f in dataclasses.fields(v)], n=1)
      hint = f"; did you mean {close[0]}?" if close else f"; sections are {', '.join(sections)}"
      raise ValueError(f"unknown config field {key!r}{hint}")
    fields = {f.name: f for f in dataclasses.fields(sections[section])}
    if field not in fields:
      close = difflib.get_close_matches(field, fields, n=1)
      hint = f"; did you mean {section}.{close[0]}?" if close else ""
      raise ValueError(f"unknown config field {key!r}{hint}")
    hints = typing.get_type_hints(type(sections[section]))
    changes[section][field] = _parse_value(text.strip(), hints[field], key.strip())
  if every_site is not None:
    for site in SITES:
      changes["model"].setdefault(f"sparsity_{site}", every_site)
  if "paths" in changes["data"] and "source" not in changes["data"]:
    changes["data"]["source"] = "files"
  # One replace per section, so that fields validated together (data.source and data.paths) change together.
  try:
    return Config(**{name: dataclasses.replace(value, **changes[name]) for name, value in sections.items()})
  except TypeError as err:  # a value of a type the section's checks cannot compare
    raise ValueError(f"invalid override: {err}") from None


def paper_pretraining(name: str, *, d_model: int, d_ff: int, num_heads: int, num_layers: int,
                      learning_rate: float, remat: str = "full", microbatches: int = 1) -> Config:
  """A from-scratch Q-Sparse preset with the paper's recipe (method.md §7).

  Sequence 2048, 0.5M tokens per batch (256 x 2048) for 50B tokens (100k steps), Adam(0.9, 0.95), weight decay 0.1,
  ReLU²GLU, top-K 70% (sparsity 0.3) at every site, bfloat16 compute, a 32k vocabulary (point data.tokenizer at a
  SentencePiece model of that size) and a TFDS text dataset. remat and microbatches size the step for its slice
  (`qsparse compile` checks a slice before a run pays for it); the blocks run as one scan, so the step compiles in
  the same time at any depth.
  """
  return Config(
      model=ModelConfig(vocab_size=32000, d_model=d_model, num_layers=num_layers, num_heads=num_heads, d_ff=d_ff,
                        max_seq_len=2048, activation="relu2", tie_embeddings=False, dtype="bfloat16", remat=remat,
                        scan_layers=True)
      .with_sparsity(0.3),
      data=DataConfig(source="tfds", tfds_name="c4/en", seq_len=2048),
      train=TrainConfig(steps=100_000, batch_size=256, microbatches=microbatches, learning_rate=learning_rate,
                        end_learning_rate=learning_rate / 10, warmup_steps=375, decay="cosine", weight_decay=0.1,
                        clip_norm=1.0, eval_every=1000, checkpoint_every=1000, out_dir=f"runs/paper_{name}"),
      mesh=MeshConfig(data=1, fsdp=-1, tensor=1),  # FSDP over every device; set tensor for the largest models
  )
