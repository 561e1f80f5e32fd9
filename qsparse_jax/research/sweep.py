"""The scaling sweep (method.md §6): a grid of model sizes x sparsities x weight precisions, each model trained on
the same text for the same number of tokens, then fitted with scaling.fit.

A sweep preset (configs/scaling_sweep.py) defines `sweep = Sweep(...)`. Every run gets its own directory,
<out_dir>/<size>-s<sparsity %>-<precision>[-seed<k>]; a run whose final_metrics.json exists is finished and not
redone, and an interrupted one resumes from its last checkpoint (qsparse_jax.training.loop.train), so `qsparse scaling sweep` can be
stopped and started again at any time.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import pathlib
from typing import Callable, Mapping

from qsparse_jax.config import Config, preset_value
from qsparse_jax.nn.model import activated_params_per_token, count_params
from qsparse_jax.training.loop import train

PRECISIONS = ("full", "ternary")  # float weights, or BitNet b1.58 weights (method.md §4)


@dataclasses.dataclass(frozen=True)
class Sweep:
  """base: the data, training and model settings shared by every run; sizes: name -> ModelConfig fields that
  set the size (d_model, num_layers, num_heads, d_ff, ...); seeds: replicates of every run, seed k adding k to the
  base's initialization seed and data shuffle seed (the validation data stay the same)."""

  base: Config
  sizes: Mapping[str, Mapping[str, int]]
  sparsities: tuple[float, ...] = (0.0, 0.3, 0.45, 0.6, 0.8)
  precisions: tuple[str, ...] = PRECISIONS
  out_dir: str = "runs/scaling"
  seeds: tuple[int, ...] = (0,)

  def __post_init__(self):
    if not self.sizes:
      raise ValueError("sweep.sizes must name at least one model size")
    if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
      raise ValueError(f"sweep.seeds must be distinct non-negative integers, at least one, got {self.seeds}")
    for precision in self.precisions:
      if precision not in PRECISIONS:
        raise ValueError(f"sweep.precisions: {precision!r} is not one of {PRECISIONS}")
    for s in self.sparsities:
      if not 0.0 <= s < 1.0:
        raise ValueError(f"sweep.sparsities: {s} is not in [0, 1)")


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  size: str
  sparsity: float
  precision: str
  seed: int
  config: Config
  non_embedding: int  # parameters, the N of the scaling law

  @property
  def directory(self) -> pathlib.Path:
    return pathlib.Path(self.config.train.out_dir).expanduser()


def runs(sweep: Sweep) -> list[Run]:
  """Every run of the sweep, smallest model first."""
  out, base = [], sweep.base
  for size, fields in sweep.sizes.items():
    # Sparsity and seed add no parameters: one count (an eval_shape) per size and precision.
    counts = {p: count_params(dataclasses.replace(base.model, **fields, ternary_weights=p == "ternary"))
              for p in sweep.precisions}
    for precision, sparsity, seed in itertools.product(sweep.precisions, sweep.sparsities, sweep.seeds):
      name = f"{size}-s{round(sparsity * 100):02d}-{precision}" + (f"-seed{seed}" if seed else "")
      model = dataclasses.replace(base.model, **fields, ternary_weights=precision == "ternary")
      train = dataclasses.replace(base.train, out_dir=str(pathlib.Path(sweep.out_dir) / name),
                                  seed=base.train.seed + seed)
      data = dataclasses.replace(base.data, shuffle_seed=base.data.shuffle_seed + seed)
      out.append(Run(name, size, sparsity, precision, seed,
                     dataclasses.replace(base, model=model.with_sparsity(sparsity), train=train, data=data),
                     counts[precision]["non_embedding"]))
  return sorted(out, key=lambda r: r.non_embedding)


def load_sweep(path: str | pathlib.Path) -> Sweep:
  """Execute a sweep preset and return its module-level `sweep`."""
  return preset_value(path, "sweep", Sweep, what="sweep", example="configs/scaling_sweep.py")


def is_finished(run: Run) -> bool:
  return (run.directory / "final_metrics.json").is_file()


def run_sweep(sweep: Sweep, *, log: Callable[[str], None] = print) -> None:
  """Train every unfinished run of the sweep, in order (resuming an interrupted one)."""
  planned = runs(sweep)
  todo = [r for r in planned if not is_finished(r)]
  log(f"sweep: {len(planned) - len(todo)} of {len(planned)} runs finished; {len(todo)} to train")
  for i, run in enumerate(todo, 1):
    log(f"[{i}/{len(todo)}] {run.name}: {run.non_embedding / 1e6:.2f}M "
        f"non-embedding parameters, sparsity {run.sparsity}, {run.precision} weights")
    result = train(run.config, log=lambda _: None)
    log(f"[{i}/{len(todo)}] {run.name}: validation loss {result['val_loss']:.4f}")


def results(sweep: Sweep) -> list[dict]:
  """One row per finished run: name, size, sparsity, precision, seed, non_embedding, activated, val_loss."""
  rows = []
  for run in runs(sweep):
    if is_finished(run):
      final = json.loads((run.directory / "final_metrics.json").read_text())
      rows.append({"name": run.name, "size": run.size, "sparsity": run.sparsity, "precision": run.precision,
                   "seed": run.seed, "non_embedding": run.non_embedding,
                   "activated": activated_params_per_token(run.config.model), "val_loss": final["val_loss"]})
  return rows
