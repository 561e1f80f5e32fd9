"""train.init_from: start a run from pretrained weights instead of a random initialization.

This is how a dense model becomes a Q-Sparse one by continued training (method.md §1, §7: Mistral 7B): the
weights come from a Hugging Face checkpoint ("hf:DIR") or from a run of `qsparse train` (its run directory), the
config switches on top-K at the sites it wants, and training starts at step 0 with a fresh optimizer state. The
model's shape and function fields must match the source; only the Q-Sparse settings (sparsities, gradient, block,
act_bits, ternary_weights), the compute dtype and the kernels may differ.
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh

from qsparse_jax import hf
from qsparse_jax.config import config_from_json
from qsparse_jax.nn.model import ModelConfig, Transformer
from qsparse_jax.parallel import sharding
from qsparse_jax.training.checkpoint import Checkpointer, checkpoint_dir
from qsparse_jax.training.optimizer import make_optimizer

# Fields that fix the parameters' shapes or the function they compute.
MODEL_FIELDS = ("vocab_size", "d_model", "num_layers", "num_heads", "kv_heads", "head_size", "d_ff", "activation",
                "tie_embeddings", "qkv_bias", "rope_theta", "rope_scaling", "rope_scaling_factor", "norm_eps")


def check_same_model(source: ModelConfig, cfg: ModelConfig, spec: str) -> None:
  """ValueError naming the first field in which cfg differs from the model at spec."""
  for name in MODEL_FIELDS:
    theirs, ours = getattr(source, name), getattr(cfg, name)
    if theirs != ours:
      raise ValueError(f"train.init_from={spec!r}: its model has {name}={theirs!r}, this config {name}={ours!r}; "
                       "only the Q-Sparse settings may differ from the model the weights come from")


def load_initial_params(spec: str, cfg: ModelConfig, mesh: Mesh, *, tokenizer: str | None = None) -> nnx.State:
  """The parameters named by spec ("hf:DIR" or a run directory of qsparse train), sharded over mesh.

  tokenizer: this run's data.tokenizer, which a qsparse train source must have been trained with too.
  """
  if spec.startswith("hf:"):
    directory = spec[len("hf:"):]
    check_same_model(hf.from_hf(hf.read_config(directory)), cfg, spec)
    return hf.load_params(directory, cfg, mesh)
  def check(meta: dict) -> bool:
    stored = config_from_json(meta)
    check_same_model(stored.model, cfg, spec)
    if tokenizer is not None and stored.data.tokenizer != tokenizer:
      raise ValueError(f"train.init_from={spec!r} was trained with data.tokenizer={stored.data.tokenizer!r}, this "
                       f"config uses {tokenizer!r}")
    return False

  def abstract_for(meta: dict):
    stored = config_from_json(meta)
    tx = make_optimizer(stored.train)  # the stored state holds that run's Adam moments; restored, then dropped
    _, params = nnx.split(nnx.eval_shape(lambda: Transformer(stored.model, rngs=nnx.Rngs(0))))
    abstract = {"step": jax.ShapeDtypeStruct((), "int32"), "params": params,
                "opt_state": jax.eval_shape(tx.init, params)}
    shardings = sharding.train_state_shardings(abstract, tx, mesh)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)

  checkpointer = Checkpointer(checkpoint_dir(spec), read_only=True)
  try:
    return checkpointer.restore_newest(abstract_for, check_meta=check).state["params"]
  finally:
    checkpointer.close()
