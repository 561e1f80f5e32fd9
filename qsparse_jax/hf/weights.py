"""Hugging Face tensors <-> the parameters of qsparse_jax.nn.model.Transformer.

Names: model.embed_tokens.weight [V, D] is `embed`; lm_head.weight [V, D] is `lm_head` [D, V] (absent when
tied); model.norm.weight is final_norm.scale; per layer i, model.layers.i.{input_layernorm, post_attention_layernorm}
are attn_norm / ffn_norm, and self_attn.{q,k,v,o}_proj / mlp.{gate,up,down}_proj weights [out, in] are the
kernels [in, out] of the same names (transposed), with Qwen2's q/k/v biases.

Import builds each parameter with jax.make_array_from_callback from memory-mapped safetensors: every device reads
only its own shard, so a model sharded over a mesh is never whole on one host.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from qsparse_jax.parallel import sharding
from qsparse_jax.hf import config as hf_config
from qsparse_jax.hf import safetensors_io
from qsparse_jax.nn.model import ModelConfig, Transformer

# Tensors some checkpoints carry that the model recomputes (rotary tables of older transformers versions).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
MAX_SHARD_BYTES = 4 << 30


def tensor_names(cfg: ModelConfig) -> dict[tuple, tuple[str, bool]]:
  """{parameter path in nnx.state(model): (Hugging Face name, transposed)} for cfg."""
  names: dict[tuple, tuple[str, bool]] = {("embed",): ("model.embed_tokens.weight", False),
                                          ("final_norm", "scale"): ("model.norm.weight", False)}
  if not cfg.tie_embeddings:
    names[("lm_head",)] = ("lm_head.weight", True)
  for i in range(cfg.num_layers):
    hf = f"model.layers.{i}"
    names[("blocks", i, "attn_norm", "scale")] = (f"{hf}.input_layernorm.weight", False)
    names[("blocks", i, "ffn_norm", "scale")] = (f"{hf}.post_attention_layernorm.weight", False)
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
      names[("blocks", i, "attn", proj, "kernel")] = (f"{hf}.self_attn.{proj}.weight", True)
    if cfg.qkv_bias:
      for proj in ("q_proj", "k_proj", "v_proj"):
        names[("blocks", i, "attn", proj, "bias")] = (f"{hf}.self_attn.{proj}.bias", False)
    for proj in ("gate_proj", "up_proj", "down_proj"):
      names[("blocks", i, "ffn", proj, "kernel")] = (f"{hf}.mlp.{proj}.weight", True)
  return names


_SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


def _declared_dtype(hf: dict) -> str | None:
  """config.json's weight dtype ("dtype", or "torch_dtype" before transformers 5), when it names a float type."""
  declared = hf.get("dtype", hf.get("torch_dtype"))
  return declared if declared in _SAFETENSORS_DTYPES else None


def read_config(directory: str | pathlib.Path) -> dict:
  path = pathlib.Path(directory) / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"no config.json in {str(directory)!r} (expected a Hugging Face model directory)")
  return json.loads(path.read_text())


def load_params(directory: str | pathlib.Path, cfg: ModelConfig, mesh: jax.sharding.Mesh | None = None) -> nnx.State:
  """The float32 parameters of Transformer(cfg) from the safetensors in directory, sharded over mesh by the
  model's logical axes (or on the default device). Every tensor is checked by name, shape and kind first."""
  checkpoint = safetensors_io.Checkpoint(directory)
  declared = _declared_dtype(read_config(directory))
  names = tensor_names(cfg)
  _, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  flat = dict(nnx.to_flat_state(abstract))
  if set(flat) != set(names):
    raise RuntimeError(f"parameter names out of step with the model: {sorted(set(flat) ^ set(names))[:3]}")
  expected_hf = {hf for hf, _ in names.values()}
  extra = sorted(n for n in checkpoint if n not in expected_hf and not n.endswith(IGNORED_SUFFIXES)
                 and not (cfg.tie_embeddings and n == "lm_head.weight"))
  if extra:
    raise hf_config.UnsupportedModelError(f"the checkpoint has tensors this config does not use, e.g. {extra[0]} "
                                          f"({len(extra)} in all): does config.json describe these weights?")
  for path, (hf_name, transposed) in names.items():
    if hf_name not in checkpoint:
      raise safetensors_io.SafetensorsError(f"tensor {hf_name} is missing from the checkpoint in {str(directory)!r}")
    shape, dtype = checkpoint.info(hf_name)
    want = tuple(flat[path].shape)
    if (shape[::-1] if transposed else shape) != want:
      implied = list(want[::-1] if transposed else want)
      raise safetensors_io.SafetensorsError(
          f"tensor {hf_name} has shape {list(shape)}, but config.json implies {implied}")
    if dtype not in _SAFETENSORS_DTYPES.values():
      raise safetensors_io.SafetensorsError(f"tensor {hf_name} has dtype {dtype}; expected a float type")
    if declared is not None and dtype != _SAFETENSORS_DTYPES[declared]:
      raise safetensors_io.SafetensorsError(
          f"tensor {hf_name} is stored as {dtype}, but config.json declares dtype {declared!r} "
          f"({_SAFETENSORS_DTYPES[declared]}): are these the weights config.json describes?")
  shardings = (sharding.param_shardings(abstract, mesh) if mesh is not None
               else jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), abstract))
  shardings_flat = dict(nnx.to_flat_state(shardings))

  def build(path, leaf):
    hf_name, transposed = names[path]
    tensor = checkpoint[hf_name]
    source = tensor.T if transposed else tensor

    def read(index):  # only this device's block of the memory-mapped tensor
      return np.asarray(source[index], dtype=np.float32)

    shard = shardings_flat[path]
    shard = shard.get_value() if hasattr(shard, "get_value") else shard
    return jax.make_array_from_callback(tuple(leaf.shape), shard, read)

  values = {path: build(path, leaf) for path, leaf in flat.items()}
  return nnx.from_flat_state({path: flat[path].replace(values[path]) for path in flat})


def _host_copy(x: jax.Array) -> np.ndarray:
  if not x.is_fully_addressable:  # a multi-host mesh: every process takes part, process 0 writes
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def save_pretrained(directory: str | pathlib.Path, cfg: ModelConfig, params: nnx.State, *, kind: str | None = None,
                    dtype=jnp.float32, max_shard_bytes: int = MAX_SHARD_BYTES) -> pathlib.Path:
  """Write params as a Hugging Face checkpoint: config.json (with the Q-Sparse settings) and safetensors in dtype,
  split into shards of at most max_shard_bytes with an index when larger. Written to a temporary folder beside
  directory and renamed into place, so a failure leaves nothing behind; an existing directory is refused."""
  directory = pathlib.Path(directory).expanduser().absolute()
  if directory.exists():
    raise FileExistsError(f"{str(directory)!r} already exists; export into a new directory")
  hf = hf_config.to_hf(cfg, kind)
  flat = dict(nnx.to_flat_state(params))
  names = tensor_names(cfg)
  missing = sorted(set(names) - set(flat), key=str)
  if missing:
    raise ValueError(f"params lack {missing[0]}: they are not the parameters of this config")
  np_dtype = np.dtype(jnp.dtype(dtype))
  tensors = {}
  for path, (hf_name, transposed) in names.items():
    value = flat[path]
    array = _host_copy(value.get_value() if hasattr(value, "get_value") else value)
    tensors[hf_name] = (array.T if transposed else array).astype(np_dtype)
  if jax.process_index() != 0:
    return directory
  hf["torch_dtype"] = hf["dtype"] = str(np_dtype) if np_dtype != np.dtype(jnp.bfloat16) else "bfloat16"
  directory.parent.mkdir(parents=True, exist_ok=True)
  staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
  try:
    (staging / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    shards, current, size = [], {}, 0
    for name in sorted(tensors):
      if current and size + tensors[name].nbytes > max_shard_bytes:
        shards.append(current)
        current, size = {}, 0
      current[name] = tensors[name]
      size += tensors[name].nbytes
    shards.append(current)
    metadata = {"format": "pt"}  # what transformers' loader expects of PyTorch-layout safetensors
    if len(shards) == 1:
      safetensors_io.save_file(shards[0], staging / safetensors_io.SINGLE, metadata)
    else:
      weight_map = {}
      for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        safetensors_io.save_file(shard, staging / file, metadata)
        weight_map.update({name: file for name in shard})
      index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
      (staging / safetensors_io.INDEX).write_text(json.dumps(index, indent=2) + "\n")
    umask = os.umask(0)  # mkdtemp's folder is private (0700); the export gets a normal folder's mode
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    staging.rename(directory)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return directory
