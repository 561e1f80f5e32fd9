"""How the loss on response tokens falls when a dense model is fine-tuned into a Q-Sparse one.

Reads the runs of configs/pretrain_tiny_dense.py (the dense model), configs/sft_tiny.py (fine-tuned on the standard
library instruction set with top-K 70% switched on at every site) and, if present, the same fine-tuning kept dense:

    qsparse train --config configs/pretrain_tiny_dense.py
    qsparse train --config configs/sft_tiny.py
    qsparse train --config configs/sft_tiny.py model.sparsity_qkv=0.0 model.sparsity_out=0.0 \\
        model.sparsity_up=0.0 model.sparsity_down=0.0 train.out_dir=runs/sft_tiny_dense
    python scripts/report_sft.py

Measured on the validation conversations the runs evaluate on (train.response_loss: mean cross-entropy over response
tokens): the pretrained dense model, the same weights with top-K switched on (step 0 of the fine-tuning), then every
evaluation of the fine-tuning runs. The last line is `sft_response_loss_vs_dense: <Q-Sparse / dense fine-tuned loss
at the last step>`.
"""

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qsparse_jax import inference
from qsparse_jax.config import load_preset
from qsparse_jax.data.inputs import make_inputs
from qsparse_jax.nn.model import Transformer
from qsparse_jax.training.step import response_loss


def val_losses(run_dir: pathlib.Path) -> dict[int, float]:
  rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
  return {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--pretrained", default="runs/tiny_dense")
  parser.add_argument("--sparse", default="runs/sft_tiny")
  parser.add_argument("--dense", default="runs/sft_tiny_dense")
  parser.add_argument("--config", default="configs/sft_tiny.py")
  args = parser.parse_args()
  cfg = load_preset(args.config)
  pretrained = inference.load(args.pretrained, pack=False)
  inputs = make_inputs(cfg.data, pretrained.tokenizer, batch_size=cfg.train.batch_size,
                       eval_batches=cfg.train.eval_batches, seed=cfg.data.shuffle_seed)

  def loss_of(model_cfg):
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0))))
    step = jax.jit(response_loss, static_argnums=0)
    return float(np.mean([float(step(graphdef, pretrained.params, jax.tree.map(jnp.asarray, b)))
                          for b in inputs.validation]))

  l_dense0, l_sparse0 = loss_of(pretrained.config.model), loss_of(cfg.model)
  print(f"validation: {inputs.summary}")
  print(f"pretrained dense model, before fine-tuning: response loss {l_dense0:.4f}")
  print(f"the same weights with top-K switched on:    response loss {l_sparse0:.4f}")
  sparse = val_losses(pathlib.Path(args.sparse))
  dense = val_losses(pathlib.Path(args.dense)) if pathlib.Path(args.dense).exists() else {}
  print(f"{'step':>5} {'Q-Sparse':>9} {'dense':>9} {'ratio':>7}")
  print(f"{0:5d} {l_sparse0:9.4f} {l_dense0:9.4f} {l_sparse0 / l_dense0:7.3f}")
  ratio = float("nan")
  for step, loss in sorted(sparse.items()):
    line = f"{step:5d} {loss:9.4f}"
    if step in dense:
      ratio = loss / dense[step]
      line += f" {dense[step]:9.4f} {ratio:7.3f}"
    print(line)
  last = max(sparse)
  print(f"Q-Sparse fine-tuning: response loss {l_sparse0:.4f} -> {sparse[last]:.4f} in {last} steps "
        f"({1 - sparse[last] / l_sparse0:.0%} lower)")
  for name, run in (("Q-Sparse", args.sparse), ("dense", args.dense)):
    final = pathlib.Path(run) / "final_metrics.json"
    if final.exists() and "sample" in json.loads(final.read_text()):
      print(f"--- {name} sample ---\n{json.loads(final.read_text())['sample']}")
  print(f"sft_response_loss_vs_dense: {ratio:.4f}")


if __name__ == "__main__":
  main()
