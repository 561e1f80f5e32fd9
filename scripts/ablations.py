"""The paper's ablations at small scale (method.md §2, §3, §5), each a table and a plot:

  STE vs masked gradient   per-layer gradient norm of each projection along training (the paper's Fig. 2: without
                           STE the bottom layers' gradients collapse), and the loss;
  top-K vs ReLU            loss, and how the sparsity ReLU gives drifts during training (top-K's is fixed);
  Block 16:32 vs top-K     loss at the same 50% sparsity;
  ReLU²GLU vs SwiGLU       loss at the same 50% sparsity.

Every run is the sweep's middle model (configs/scaling_sweep.py, d128: 0.59M non-embedding parameters) trained on the
same text for the same steps, in segments: after each, the script measures the validation loss, the sparsity each
projection's input has (qsparse_jax.inference.evaluation) and the gradient norm of every projection on a fixed batch. Runs
and measurements already on disk are not redone.

    python scripts/ablations.py [--out runs/ablations] [--plots docs/] [--steps 400 --segment 100]

The last line is `ablation_masked_vs_ste_val_loss: <ratio of final validation losses>`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib

import jax
import numpy as np
from flax import nnx

from qsparse_jax.data.text import lm_batches, text_source
from qsparse_jax.data.tokenizers import make_tokenizer
from qsparse_jax import inference
from qsparse_jax.inference import evaluation
from qsparse_jax.research.sweep import load_sweep
from qsparse_jax.training.loop import train
from qsparse_jax.training.step import lm_loss

RUNS = {  # name -> ModelConfig changes from the dense base
    "dense": {},
    "topk50_ste": {"sparsity": 0.5},
    "topk50_masked": {"sparsity": 0.5, "gradient": "masked"},
    "relu": {"sparsifier": "relu"},
    "topk50_swiglu": {"sparsity": 0.5, "activation": "silu"},
    # n:m blocks of 32 need widths divisible by 32: d_ff 352 instead of 344, with its own top-K reference
    "topk50_ste_ff352": {"sparsity": 0.5, "d_ff": 352},
    "block16_32": {"block": (16, 32), "d_ff": 352},
}
COMPARISONS = {
    "STE vs masked gradient (top-K 50%)": ("topk50_ste", "topk50_masked"),
    "top-K 50% vs ReLU": ("topk50_ste", "relu"),
    "Block 16:32 vs top-K 50% (d_ff 352)": ("topk50_ste_ff352", "block16_32"),
    "ReLU²GLU vs SwiGLU (top-K 50%)": ("topk50_ste", "topk50_swiglu"),
}


def run_config(base, name: str, out: pathlib.Path, steps: int, segment: int):
  changes = dict(RUNS[name])
  sparsity = changes.pop("sparsity", 0.0)
  model = dataclasses.replace(base.model, **changes).with_sparsity(sparsity)
  tc = dataclasses.replace(base.train, steps=steps, eval_every=segment, checkpoint_every=segment, keep_checkpoints=1,
                           out_dir=str(out / name), sample_tokens=0, progress=False)
  return dataclasses.replace(base, model=model, train=tc)


def gradient_norms(loaded, batch) -> dict[str, dict[str, float]]:
  """{layer: {projection: ‖∂L/∂W‖₂}} on one batch of tokens [B, T+1] (W: each projection's kernel)."""
  grads = jax.jit(jax.grad(lambda p: lm_loss(loaded.graphdef, p, batch)))(loaded.params)
  norms: dict[str, dict[str, float]] = {}
  for path, leaf in nnx.to_flat_state(grads):  # ("blocks", layer, "attn" | "ffn", "<name>_proj", "kernel")
    if path[0] == "blocks" and path[-1] == "kernel":
      value = leaf.get_value() if hasattr(leaf, "get_value") else leaf
      norms.setdefault(str(path[1]), {})[str(path[-2])] = float(np.linalg.norm(np.asarray(value, np.float64)))
  return norms


def measure(config, batches, grad_batch) -> dict:
  loaded = inference.load(config.train.out_dir, pack=False)
  ev = evaluation.evaluate(loaded.graphdef, loaded.params, loaded.config.model, batches, step=loaded.step)
  return {"step": loaded.step, "val_loss": ev.loss, "sparsity": ev.sparsity, "overall": ev.overall,
          "grad_norms": gradient_norms(loaded, grad_batch)}


def run(base, name, out, steps, segment, log) -> list[dict]:
  """Train one ablation run segment by segment, measuring after each; returns its rows (cached on disk)."""
  config = run_config(base, name, out, steps, segment)
  rows_path = out / name / "ablation.jsonl"
  rows = [json.loads(line) for line in rows_path.read_text().splitlines()] if rows_path.exists() else []
  if rows and rows[-1]["step"] >= steps:
    return rows  # measured already: no batches to build
  tokenizer = make_tokenizer(config.data.tokenizer)
  batches = evaluation.validation_batches(config, tokenizer, num_batches=4, batch_size=config.train.batch_size)
  grad_batch = next(iter(lm_batches(text_source(config.data, "train"), tokenizer,
                                             seq_len=config.data.seq_len, batch_size=config.train.batch_size,
                                             seed=1234)))["tokens"]
  while not rows or rows[-1]["step"] < steps:
    done = rows[-1]["step"] if rows else 0
    train(config, log=lambda _: None, stop_after=segment - done % segment)
    rows.append(measure(config, batches, grad_batch))
    rows_path.parent.mkdir(parents=True, exist_ok=True)
    rows_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    log(f"{name}: step {rows[-1]['step']}, validation loss {rows[-1]['val_loss']:.4f}, measured sparsity "
        f"{rows[-1]['overall']:.1%}")
  return rows


def layer_means(row) -> list[float]:
  """Mean over projections of the gradient norm, per layer (bottom first)."""
  layers = sorted(row["grad_norms"], key=int)
  return [float(np.mean(list(row["grad_norms"][layer].values()))) for layer in layers]


def report(results: dict[str, list[dict]]) -> str:
  lines = ["final validation loss (nats/byte):"]
  dense = results["dense"][-1]["val_loss"]
  for name, rows in results.items():
    lines.append(f"  {name:<14} {rows[-1]['val_loss']:.4f}  ({rows[-1]['val_loss'] / dense - 1:+.2%} vs dense, "
                 f"measured sparsity {rows[-1]['overall']:.1%})")
  for title, (a, b) in COMPARISONS.items():
    la, lb = results[a][-1]["val_loss"], results[b][-1]["val_loss"]
    lines.append(f"{title}: {la:.4f} vs {lb:.4f} ({lb / la - 1:+.2%})")
  lines.append("gradient norm per layer (mean over projections), bottom layer first:")
  for name in ("dense", "topk50_ste", "topk50_masked"):
    for row in (results[name][0], results[name][-1]):
      lines.append(f"  {name:<14} step {row['step']:>4}: " + "  ".join(f"{v:.3e}" for v in layer_means(row)))
  lines.append("ReLU's measured sparsity along training (q/k/v, out, up, gate, down; overall):")
  for row in results["relu"]:
    lines.append(f"  step {row['step']:>4}: " + " ".join(f"{v:6.1%}" for v in row["sparsity"].values()) +
                 f"  overall {row['overall']:.1%}")
  return "\n".join(lines)


def plot(results: dict[str, list[dict]], out_dir: pathlib.Path) -> list[pathlib.Path]:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  out_dir.mkdir(parents=True, exist_ok=True)
  paths = []
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for name, style in (("dense", "k-"), ("topk50_ste", "b-"), ("topk50_masked", "r-")):
    for row, alpha in ((results[name][0], 0.4), (results[name][-1], 1.0)):
      axes[0].plot(layer_means(row), style, alpha=alpha, marker="o", label=f"{name}, step {row['step']}")
  axes[0].set(xlabel="layer (bottom = 0)", ylabel="gradient norm (mean over projections)", yscale="log",
              title="STE vs masked gradient (paper Fig. 2)")
  axes[0].legend(fontsize=7)
  for name in results:
    axes[1].plot([r["step"] for r in results[name]], [r["val_loss"] for r in results[name]], marker="o", label=name)
  axes[1].set(xlabel="step", ylabel="validation loss (nats/byte)", title="every ablation run")
  axes[1].legend(fontsize=7)
  fig.tight_layout()
  paths.append(out_dir / "ablation_ste_and_losses.png")
  fig.savefig(paths[-1], dpi=120)
  plt.close(fig)
  fig, ax = plt.subplots(figsize=(6, 4))
  rows = results["relu"]
  for kind in rows[0]["sparsity"]:
    ax.plot([r["step"] for r in rows], [r["sparsity"][kind] for r in rows], marker="o", label=kind)
  ax.plot([r["step"] for r in rows], [r["overall"] for r in rows], "k--", label="overall")
  ax.axhline(0.5, color="gray", linestyle=":", label="top-K 50% (fixed)")
  ax.set(xlabel="step", ylabel="measured sparsity of the projection input", title="ReLU sparsity drift")
  ax.legend(fontsize=7)
  fig.tight_layout()
  paths.append(out_dir / "ablation_relu_drift.png")
  fig.savefig(paths[-1], dpi=120)
  plt.close(fig)
  return paths


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sweep", default="configs/scaling_sweep.py", help="its base config and sizes are used")
  parser.add_argument("--size", default="d128")
  parser.add_argument("--out", default="runs/ablations")
  parser.add_argument("--plots", help="write the PNGs into this folder")
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--segment", type=int, default=100)
  args = parser.parse_args()
  plan = load_sweep(args.sweep)
  base = dataclasses.replace(plan.base, model=dataclasses.replace(plan.base.model, **plan.sizes[args.size]))
  out = pathlib.Path(args.out)
  results = {name: run(base, name, out, args.steps, args.segment, print) for name in RUNS}
  print(report(results))
  if args.plots:
    for path in plot(results, pathlib.Path(args.plots)):
      print(f"wrote {path}")
  ratio = results["topk50_masked"][-1]["val_loss"] / results["topk50_ste"][-1]["val_loss"]
  print(f"ablation_masked_vs_ste_val_loss: {ratio:.4f}")


if __name__ == "__main__":
  main()
