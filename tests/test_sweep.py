"""The scaling sweep trains each run once and resumes; `qsparse scaling fit` fits the finished runs."""

import dataclasses
import json
import pathlib
import textwrap

import numpy as np
import pytest

from qsparse_jax import cli
from qsparse_jax.research import scaling, scaling_report, sweep
from qsparse_jax.nn.model import count_params


def write_sweep(tmp_path, sizes, sparsities, precisions=("full",), steps=2, seeds=(0,)):
  tmp_path.mkdir(exist_ok=True)
  corpus = tmp_path / "corpus.txt"
  rng = np.random.default_rng(0)
  corpus.write_text("\n".join(" ".join(rng.choice(["a", "bb", "ccc", "dd"], 6)) for _ in range(300)))
  preset = tmp_path / "sweep.py"
  preset.write_text(textwrap.dedent(f"""
      from qsparse_jax.config import Config, DataConfig, TrainConfig
      from qsparse_jax.nn.model import ModelConfig
      from qsparse_jax.research.sweep import Sweep
      sweep = Sweep(
          base=Config(model=ModelConfig(vocab_size=257, max_seq_len=16),
                      data=DataConfig(source="files", paths=({str(corpus)!r},), seq_len=16,
                                      data_dir={str(tmp_path / "tfds")!r}),
                      train=TrainConfig(steps={steps}, batch_size=8, warmup_steps=1, eval_every={steps},
                                        eval_batches=1, log_every=1, checkpoint_every={steps}, sample_tokens=0,
                                        progress=False)),
          sizes={sizes!r}, sparsities={sparsities!r}, precisions={precisions!r}, seeds={seeds!r},
          out_dir={str(tmp_path / "runs")!r})
      """))
  return preset


def write_and_load(tmp_path, sparsities, precisions):
  return sweep.load_sweep(write_sweep(tmp_path / "other", {"d16": dict(d_model=16, num_layers=1, num_heads=2,
                                                                         d_ff=32)}, sparsities, precisions))


def test_sweep_trains_each_run_once(tmp_path):
  preset = write_sweep(tmp_path, {"d16": dict(d_model=16, num_layers=1, num_heads=2, d_ff=32)}, (0.5,))
  plan = sweep.load_sweep(preset)
  assert [r.name for r in sweep.runs(write_and_load(tmp_path, (0.0, 0.5), ("full", "ternary")))] == [
      "d16-s00-full", "d16-s50-full", "d16-s00-ternary", "d16-s50-ternary"]
  logs = []
  sweep.run_sweep(plan, log=logs.append)
  assert logs[0] == "sweep: 0 of 1 runs finished; 1 to train"
  (row,) = sweep.results(plan)
  assert row["name"] == "d16-s50-full" and row["sparsity"] == 0.5 and row["precision"] == "full"
  final = json.loads((tmp_path / "runs" / row["name"] / "final_metrics.json").read_text())
  assert row["val_loss"] == final["val_loss"] and final["step"] == 2
  # parameters: 4 attention and 3 GLU matrices and 3 norm scales; activated: each matrix at half its weights
  projections = 4 * 16 * 16 + 3 * 16 * 32
  assert row["non_embedding"] == projections + 3 * 16 and row["activated"] == projections / 2
  stamp = (tmp_path / "runs" / "d16-s50-full" / "final_metrics.json").stat().st_mtime_ns
  logs.clear()
  sweep.run_sweep(plan, log=logs.append)  # nothing is redone
  assert logs == ["sweep: 1 of 1 runs finished; 0 to train"]
  assert (tmp_path / "runs" / "d16-s50-full" / "final_metrics.json").stat().st_mtime_ns == stamp


def test_seeds_replicate_every_run(tmp_path):
  plan = dataclasses.replace(write_and_load(tmp_path, (0.5,), ("full",)), seeds=(0, 2))
  planned = [(r.name, r.seed, r.config.train.seed, r.config.data.shuffle_seed, pathlib.Path(r.config.train.out_dir))
             for r in sweep.runs(plan)]
  runs_dir = tmp_path / "other" / "runs"
  assert planned == [("d16-s50-full", 0, 0, 0, runs_dir / "d16-s50-full"),  # seed 0 keeps the unseeded name
                     ("d16-s50-full-seed2", 2, 2, 2, runs_dir / "d16-s50-full-seed2")]
  with pytest.raises(ValueError, match=r"sweep.seeds must be distinct non-negative integers, at least one, "
                                       r"got \(1, 1\)"):
    dataclasses.replace(plan, seeds=(1, 1))


def test_fit_command_fits_the_finished_runs(tmp_path, monkeypatch, capsys):
  sizes = {f"d{d}": dict(d_model=d, num_layers=1, num_heads=2, d_ff=2 * d) for d in (16, 32, 64)}
  preset = write_sweep(tmp_path, sizes, (0.0, 0.3, 0.45, 0.6, 0.8))
  plan = sweep.load_sweep(preset)
  true = scaling.ScalingLaw(E=1.9, B=0.05, C=2.5, beta=0.08, alpha=0.15)
  for run in sweep.runs(plan):  # finished runs whose losses follow a known law (training them is the other test)
    run.directory.mkdir(parents=True)
    n = count_params(run.config.model)["non_embedding"]
    (run.directory / "final_metrics.json").write_text(json.dumps({"step": 2, "val_loss": true.loss(n, run.sparsity)}))
  monkeypatch.setattr(scaling, "DEFAULT_GRID", {"e": (0.5,), "b": (-2.0, 0.0), "c": (0.0, 1.0), "beta": (0.0,),
                                                "alpha": (0.1, 0.3)})
  out = tmp_path / "fit.json"
  assert cli.main(["scaling", "fit", "--sweep", str(preset), "--json", str(out), "--plots", str(tmp_path)]) == 0
  printed = capsys.readouterr().out
  fitted = json.loads(out.read_text())["fits"]["full"]
  for name, value in true.as_dict().items():
    assert fitted[name] == pytest.approx(value, rel=2e-2 if name == "B" else 1e-3), name
  assert fitted["optimal_sparsity"] == pytest.approx(scaling.optimal_sparsity(true), abs=2e-3)
  lo, hi = fitted["optimal_sparsity_leave_one_out"]  # exact points: no single run moves S*
  assert lo == pytest.approx(fitted["optimal_sparsity"], abs=1e-3) and hi == pytest.approx(lo, abs=1e-3)
  assert f"{scaling.optimal_sparsity(true):7.2%}" in printed and "45.58%" in printed  # beside the paper's
  for name in ("loss_vs_activated.png", "loss_vs_sparsity.png"):
    assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_loss_table_averages_seeds_and_names_the_largest_difference():
  def row(size, n, s, loss, seed=0):
    return {"size": size, "non_embedding": n, "precision": "full", "sparsity": s, "seed": seed, "val_loss": loss}

  rows = [row("d32", 2e6, 0.0, 2.0), row("d32", 2e6, 0.5, 2.2), row("d32", 2e6, 0.5, 2.31, seed=1),
          row("d16", 5e5, 0.5, 2.5), row("d16", 5e5, 0.5, 2.55, seed=1)]
  assert scaling_report.loss_table(rows).splitlines() == [
      "  size  non-emb  weights   S=0.00   S=0.50",
      "   d16    0.50M     full        -   2.5250",  # smallest first; a point not run is a dash
      "   d32    2.00M     full   2.0000   2.2550",
      "2 of 3 points with several seeds; the largest difference between seeds: 5.00% (d32, full, S=0.50)"]


def test_fit_of_one_seed_uses_only_its_runs(tmp_path, monkeypatch, capsys):
  sizes = {f"d{d}": dict(d_model=d, num_layers=1, num_heads=2, d_ff=2 * d) for d in (16, 32, 64)}
  preset = write_sweep(tmp_path, sizes, (0.0, 0.3, 0.45, 0.6, 0.8), seeds=(0, 1))
  laws = {0: scaling.ScalingLaw(E=1.9, B=0.05, C=2.5, beta=0.08, alpha=0.15),
          1: scaling.ScalingLaw(E=1.7, B=0.05, C=3.0, beta=0.12, alpha=0.20)}
  for run in sweep.runs(sweep.load_sweep(preset)):  # each seed's runs follow their own law
    run.directory.mkdir(parents=True)
    loss = laws[run.seed].loss(count_params(run.config.model)["non_embedding"], run.sparsity)
    (run.directory / "final_metrics.json").write_text(json.dumps({"step": 2, "val_loss": loss}))
  monkeypatch.setattr(scaling, "DEFAULT_GRID", {"e": (0.5,), "b": (-2.0, 0.0), "c": (0.0, 1.0), "beta": (0.0,),
                                                "alpha": (0.1, 0.3)})
  for seed, law in laws.items():
    out = tmp_path / f"fit{seed}.json"
    assert cli.main(["scaling", "fit", "--sweep", str(preset), "--seed", str(seed), "--json", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"15 runs from {tmp_path / 'runs'} (seed {seed})\n")
    fitted = json.loads(out.read_text())["fits"]["full"]
    assert fitted["optimal_sparsity"] == pytest.approx(scaling.optimal_sparsity(law), abs=2e-3)
  assert cli.main(["scaling", "fit", "--sweep", str(preset), "--seed", "2"]) == 2
  assert capsys.readouterr().err.strip() == f"qsparse scaling: error: --seed 2: the sweep {preset} has seeds (0, 1)"


def test_fit_without_enough_runs_is_one_error(tmp_path, capsys):
  preset = write_sweep(tmp_path, {"d16": dict(d_model=16, num_layers=1, num_heads=2, d_ff=32)}, (0.0, 0.5))
  assert cli.main(["scaling", "fit", "--sweep", str(preset)]) == 2
  assert capsys.readouterr().err.strip() == (
      f"qsparse scaling: error: 0 finished runs under {tmp_path / 'runs'}; a fit needs 5 of one weight precision: "
      f"run `qsparse scaling sweep --sweep {preset}` first")
