"""How much of the dense model's validation loss continued training with Q-Sparse recovers, and how fast.

Reads the runs of configs/pretrain_tiny_dense.py (dense), configs/continue_tiny.py (Q-Sparse, top-K 70% at every
site) and, if present, the same continuation kept dense (a baseline for what the extra steps alone give):

    qsparse train --config configs/pretrain_tiny_dense.py
    qsparse train --config configs/continue_tiny.py
    qsparse train --config configs/continue_tiny.py model.sparsity_qkv=0.0 model.sparsity_out=0.0 \\
        model.sparsity_up=0.0 model.sparsity_down=0.0 train.out_dir=runs/continue_tiny_dense
    python scripts/report_continued.py

Measured on the validation batches the runs evaluate on: L_dense (the dense model), L_0 (its weights with top-K
switched on, before any continued training), L_t (after t continued steps), the share of the switch-on gap won
back, (L_0 - L_t) / (L_0 - L_dense), the first step at which L_t <= L_dense, and the gap to the dense
continuation at every step. The last line is `continued_gap_vs_dense: <relative gap at the last step>`.
"""

import argparse
import json
import pathlib

from flax import nnx

from qsparse_jax import inference
from qsparse_jax.inference import evaluation
from qsparse_jax.config import load_preset
from qsparse_jax.nn.model import Transformer


def val_losses(run_dir: pathlib.Path) -> dict[int, float]:
  rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
  return {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--dense", default="runs/tiny_dense")
  parser.add_argument("--continued", default="runs/continue_tiny")
  parser.add_argument("--baseline", default="runs/continue_tiny_dense")
  parser.add_argument("--config", default="configs/continue_tiny.py")
  args = parser.parse_args()
  sparse_cfg = load_preset(args.config)
  dense = inference.load(args.dense, pack=False)
  batches = evaluation.validation_batches(dense.config, dense.tokenizer, num_batches=dense.config.train.eval_batches,
                                          batch_size=dense.config.train.batch_size)
  l_dense = evaluation.evaluate(dense.graphdef, dense.params, dense.config.model, batches).loss
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(sparse_cfg.model, rngs=nnx.Rngs(0))))
  switched_on = evaluation.evaluate(graphdef, dense.params, sparse_cfg.model, batches)
  l_0 = switched_on.loss
  print(f"dense model (step {dense.step}): validation loss {l_dense:.4f}")
  print(f"top-K switched on, no training: {l_0:.4f} (measured sparsity {switched_on.overall:.1%} overall)")
  baseline = val_losses(pathlib.Path(args.baseline)) if pathlib.Path(args.baseline).exists() else {}
  print(f"{'step':>5} {'Q-Sparse':>9} {'won back':>9} {'dense, same steps':>18} {'gap':>7}")
  gap, caught_up = float("nan"), None
  for step, loss in sorted(val_losses(pathlib.Path(args.continued)).items()):
    won_back = (l_0 - loss) / (l_0 - l_dense)
    if caught_up is None and loss <= l_dense:
      caught_up = step
    line = f"{step:5d} {loss:9.4f} {won_back:9.0%}"
    if step in baseline:
      gap = (loss - baseline[step]) / baseline[step]
      line += f" {baseline[step]:18.4f} {gap:+7.2%}"
    print(line)
  print(f"Q-Sparse at or below the dense model's loss from step {caught_up}" if caught_up else
        "Q-Sparse has not reached the dense model's loss")
  print(f"continued_gap_vs_dense: {gap:.4f}")


if __name__ == "__main__":
  main()
