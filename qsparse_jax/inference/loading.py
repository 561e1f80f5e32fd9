"""Loading a trained run for inference: its config, tokenizer and parameters from its newest Orbax checkpoint that
restores."""

from __future__ import annotations

import dataclasses
import pathlib

import jax
from flax import nnx

from qsparse_jax.config import Config, config_from_json
from qsparse_jax.data import tokenizers
from qsparse_jax.nn.linear import pack_ternary_layers
from qsparse_jax.nn.model import ModelConfig, Transformer
from qsparse_jax.parallel import sharding
from qsparse_jax.training.checkpoint import Checkpointer, CheckpointMismatchError, checkpoint_dir
from qsparse_jax.training.init_from import MODEL_FIELDS
from qsparse_jax.training.optimizer import make_optimizer


@dataclasses.dataclass
class LoadedModel:
  config: Config
  graphdef: nnx.GraphDef
  params: nnx.State
  tokenizer: tokenizers.Tokenizer
  step: int
  packed: bool = False  # ternary weights packed to 2 bits (nn.linear.pack_ternary_layers)


def load(path: str | pathlib.Path, *, step: int | None = None, tokenizer: str | None = None,
         pack: bool = True, mesh: jax.sharding.Mesh | None = None) -> LoadedModel:
  """The model of the newest checkpoint under path that restores (or of checkpoint `step`), its config and tokenizer.

  A checkpoint that cannot be read back is passed over for the next older one, with a CheckpointWarning naming its
  step and file; with `step`, that checkpoint or a CheckpointRestoreError. Nothing is moved or written.
  tokenizer: to insist on one (e.g. "byte"); a different one than the checkpoint was trained with is refused.
  pack: for a model trained with ternary weights (BitNet b1.58), replace each projection's float kernel by its
    ternary codes packed 4 to a byte, so it multiplies through ternary_matmul (int8 x 2-bit) at 1/16 of the bytes.
  mesh: restore the parameters sharded over it as in training (sharding.param_shardings), each device reading only
    its own shard, instead of whole onto the first local device.
  """
  def check(meta: dict) -> bool:
    trained_with = config_from_json(meta).data.tokenizer
    if tokenizer is not None and tokenizer != trained_with:
      raise CheckpointMismatchError(f"the checkpoint was trained with tokenizer {trained_with!r}, not "
                                    f"{tokenizer!r}; leave the tokenizer out to use the checkpoint's")
    return False

  def abstract_for(meta: dict):
    config = config_from_json(meta)
    tx = make_optimizer(config.train)
    _, abstract_params = nnx.split(nnx.eval_shape(lambda: Transformer(config.model, rngs=nnx.Rngs(0))))
    abstract = {"step": jax.ShapeDtypeStruct((), "int32"), "params": abstract_params,
                "opt_state": jax.eval_shape(tx.init, abstract_params)}
    if mesh is not None:
      shardings = sharding.train_state_shardings(abstract, tx, mesh)
      return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # whatever mesh wrote it
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=here), abstract)

  checkpointer = Checkpointer(checkpoint_dir(path), read_only=True)
  try:
    restored = checkpointer.restore_newest(abstract_for, step=step, check_meta=check)
  finally:
    checkpointer.close()
  config = config_from_json(restored.meta)
  tok = tokenizers.make_tokenizer(config.data.tokenizer)
  if tok.vocab_size > config.model.vocab_size:
    raise CheckpointMismatchError(f"tokenizer {tok.name} has {tok.vocab_size} tokens, the model only "
                                  f"{config.model.vocab_size}")
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(config.model, rngs=nnx.Rngs(0))))
  params = restored.state["params"]
  packed = pack and config.model.ternary_weights
  if packed:
    model = nnx.merge(graphdef, params)
    pack_ternary_layers(model)
    graphdef, params = nnx.split(model)
  return LoadedModel(config=config, graphdef=graphdef, params=params, tokenizer=tok, step=restored.step,
                     packed=packed)


def with_model(loaded: LoadedModel, model: ModelConfig) -> LoadedModel:
  """The same weights run as `model` (another sparsity, gradient, block, quantization or kernels): only fields that
  leave the weights' shapes and function alone (init_from.MODEL_FIELDS) may differ from the checkpoint's model."""
  for name in MODEL_FIELDS:
    if getattr(model, name) != getattr(loaded.config.model, name):
      raise ValueError(f"model.{name}={getattr(model, name)!r} differs from the checkpoint's "
                       f"{getattr(loaded.config.model, name)!r}: that field fixes the weights; only the Q-Sparse "
                       "settings (model.sparsity*, gradient, block, act_bits, ternary_weights, kernels) can change")
  if loaded.packed:
    raise ValueError("a model loaded with packed ternary weights cannot change its settings; load it with pack=False")
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(model, rngs=nnx.Rngs(0))))
  return dataclasses.replace(loaded, config=dataclasses.replace(loaded.config, model=model), graphdef=graphdef)
