"""Loading a trained run for inference: its config, tokenizer and parameters from the latest Orbax checkpoint."""

from __future__ import annotations

import dataclasses
import pathlib

import jax
from flax import nnx

from qsparse_jax.config import Config, config_from_json
from qsparse_jax.data import tokenizers
from qsparse_jax.nn.linear import pack_ternary_layers
from qsparse_jax.nn.model import Transformer
from qsparse_jax.training.checkpoint import Checkpointer, CheckpointMismatchError, checkpoint_dir
from qsparse_jax.training.optimizer import make_optimizer


@dataclasses.dataclass
class LoadedModel:
  config: Config
  graphdef: nnx.GraphDef
  params: nnx.State
  tokenizer: tokenizers.Tokenizer
  step: int
  packed: bool = False  # ternary weights packed to 2 bits (nn.linear.pack_ternary_layers)


def load(path: str | pathlib.Path, *, tokenizer: str | None = None, pack: bool = True) -> LoadedModel:
  """The model of the latest checkpoint under path, its config and tokenizer.

  tokenizer: to insist on one (e.g. "byte"); a different one than the checkpoint was trained with is refused.
  pack: for a model trained with ternary weights (BitNet b1.58), replace each projection's float kernel by its
    ternary codes packed 4 to a byte, so it multiplies through ternary_matmul (int8 x 2-bit) at 1/16 of the bytes.
  """
  checkpointer = Checkpointer(checkpoint_dir(path))
  try:
    config = config_from_json(checkpointer.read_meta())
    if tokenizer is not None and tokenizer != config.data.tokenizer:
      raise CheckpointMismatchError(f"the checkpoint was trained with tokenizer {config.data.tokenizer!r}, not "
                                    f"{tokenizer!r}; leave the tokenizer out to use the checkpoint's")
    tok = tokenizers.make_tokenizer(config.data.tokenizer)
    if tok.vocab_size > config.model.vocab_size:
      raise CheckpointMismatchError(f"tokenizer {tok.name} has {tok.vocab_size} tokens, the model only "
                                    f"{config.model.vocab_size}")
    tx = make_optimizer(config.train)
    model = nnx.eval_shape(lambda: Transformer(config.model, rngs=nnx.Rngs(0)))
    graphdef, abstract_params = nnx.split(model)
    abstract = {"step": jax.ShapeDtypeStruct((), "int32"), "params": abstract_params,
                "opt_state": jax.eval_shape(tx.init, abstract_params)}
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # whatever mesh wrote it
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=here), abstract)
    state, _ = checkpointer.restore(abstract)
  finally:
    checkpointer.close()
  params = state["params"]
  packed = pack and config.model.ternary_weights
  if packed:
    model = nnx.merge(graphdef, params)
    pack_ternary_layers(model)
    graphdef, params = nnx.split(model)
  return LoadedModel(config=config, graphdef=graphdef, params=params, tokenizer=tok, step=int(state["step"]),
                     packed=packed)
