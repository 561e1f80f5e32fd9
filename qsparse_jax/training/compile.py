"""Will it fit? The train step (or generate's decode step) compiled ahead of time for a TPU slice or a set of
NVIDIA GPUs, on any machine (`qsparse compile`).

libtpu compiles for a TPU topology without a TPU, and jax's CUDA plugin for GPUs without a GPU from XLA's description
of one (jax.experimental.topologies): the program is the one `qsparse train` would run there (the same mesh,
shardings, remat and micro-batches), and XLA's own memory and cost analyses say per chip how many bytes it needs and
how many FLOPs it does. A TPU run that does not fit fails to compile with RESOURCE_EXHAUSTED; a GPU program's peak is
compared with the GPU's memory here. Either way it is reported, with what to change.

Accelerator types are Cloud TPU's: v4-32, v5p-128 (their number counts TensorCores, two per chip), v5litepod-16 or
v5e-16, v6e-64 (their number counts chips); and GPUs as MODELxN: h100x8, h200x8, h200x16 (hosts of 8 GPUs; 1, 2 and
4 GPUs make one host). The GPU descriptions are package data (gpu_specs/): XLA's H100 SXM one, and an H200 derived
from it (see its file). GPU targets need the CUDA plugin, which `scripts/cuda_compile_env.sh` installs in a separate
environment (.venv-cuda).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import importlib.util
import math
import re
import time

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qsparse_jax.config import Config
from qsparse_jax.nn.cache_attention import BLOCK as CACHE_BLOCK
from qsparse_jax.nn.model import Transformer, activated_params_per_token, count_params, init_cache
from qsparse_jax.parallel import sharding
from qsparse_jax.training import hlo_traffic
from qsparse_jax.training.optimizer import make_optimizer
from qsparse_jax.training.step import lm_loss, make_train_step, response_loss

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation or GPU model: HBM per chip, peak dense bfloat16 FLOP/s per chip, and how its accelerator
  types count."""

  generation: str
  hbm_bytes: int
  peak_flops: float
  cores_per_chip: int  # what the number in "v5p-128" counts per chip: 2 TensorCores (v4, v5p) or 1 (v5e, v6e, GPUs)
  dims: int  # 3 for the 3D tori of v4 / v5p, 2 for v5e / v6e (GPUs: 0)
  spec: str = ""  # a GPU's XLA target config in gpu_specs/ (its device_memory_size is hbm_bytes); "" for a TPU

  @property
  def platform(self) -> str:
    return "cuda" if self.spec else "tpu"


CHIPS = {
    "v4": Chip("v4", 32 * GIB, 275e12, 2, 3),
    "v5e": Chip("v5e", 16 * GIB, 197e12, 1, 2),
    "v5p": Chip("v5p", 95 * GIB, 459e12, 2, 3),
    "v6e": Chip("v6e", 32 * GIB, 918e12, 1, 2),
}
ALIASES = {"v5litepod": "v5e"}
GPUS = {  # SXM parts, dense bf16 peak without sparsity
    "h100": Chip("h100", 84_978_434_048, 989e12, 1, 0, "h100_sxm.txtpb"),
    "h200": Chip("h200", 150_210_609_152, 989e12, 1, 0, "h200_sxm.txtpb"),
}
GPUS_PER_HOST = 8
CUDA_SETUP = ("compiling for a GPU needs jax's CUDA plugin, which this environment lacks: run "
              "scripts/cuda_compile_env.sh (it makes .venv-cuda) and run .venv-cuda/bin/qsparse compile ... there")


@dataclasses.dataclass(frozen=True)
class Slice:
  accelerator_type: str
  chip: Chip
  chips: int
  topology: str  # jax.experimental.topologies' name: "v5p:4x4x4" for a TPU; "1xHOSTSxGPUS_PER_HOST" for GPUs

  @property
  def unit(self) -> str:
    return "GPU" if self.chip.platform == "cuda" else "chip"


def parse_slice(accelerator_type: str) -> Slice:
  """v5p-128 -> 64 v5p chips as "v5p:4x4x4"; h200x16 -> 16 H200s on two hosts, "1x2x8". ValueError naming the known
  generations for anything else."""
  gpu = re.fullmatch(r"([a-z]\d+)x(\d+)", accelerator_type.strip().lower())
  if gpu:
    return _gpu_slice(accelerator_type, gpu.group(1), int(gpu.group(2)))
  found = re.fullmatch(r"(v[0-9a-z]+)-(\d+)", accelerator_type.strip().lower())
  generation = ALIASES.get(found.group(1), found.group(1)) if found else None
  if generation not in CHIPS:
    raise ValueError(f"--topology {accelerator_type!r} is not a Cloud TPU accelerator type or GPU set; expected "
                     f"GENERATION-N with GENERATION one of {', '.join(CHIPS)} (or v5litepod), e.g. v5p-128 or v6e-64, "
                     f"or GPUxN with GPU one of {', '.join(GPUS)}, e.g. h200x8")
  chip = CHIPS[generation]
  number = int(found.group(2))
  chips = number // chip.cores_per_chip
  if number % chip.cores_per_chip or chips < 1 or chips & (chips - 1):
    raise ValueError(f"--topology {accelerator_type!r}: {generation} slices have a power-of-two number of chips"
                     f"{' (the type counts 2 TensorCores per chip)' if chip.cores_per_chip == 2 else ''}")
  return Slice(accelerator_type, chip, chips, f"{generation}:{'x'.join(map(str, torus(chips, chip.dims)))}")


def _gpu_slice(accelerator_type: str, model: str, gpus: int) -> Slice:
  if model not in GPUS:
    raise ValueError(f"--topology {accelerator_type!r}: no GPU description for {model.upper()} is shipped; GPUs: "
                     f"{', '.join(GPUS)} (e.g. h200x8)")
  if gpus < 1 or (gpus > GPUS_PER_HOST and gpus % GPUS_PER_HOST) or (gpus < GPUS_PER_HOST and gpus & (gpus - 1)):
    raise ValueError(f"--topology {accelerator_type!r}: GPUs come as 1, 2 or 4 on one host or in hosts of "
                     f"{GPUS_PER_HOST} (8, 16, 24, ...)")
  hosts, per_host = max(1, gpus // GPUS_PER_HOST), min(gpus, GPUS_PER_HOST)
  return Slice(accelerator_type, GPUS[model], gpus, f"1x{hosts}x{per_host}")


def gpu_target_config(chip: Chip) -> str:
  """The GpuTargetConfigProto text XLA compiles for (gpu_specs/, package data)."""
  return (importlib.resources.files("qsparse_jax.training") / "gpu_specs" / chip.spec).read_text(encoding="utf-8")


def check_platform(tpu: Slice) -> None:
  """ValueError saying what to install when this environment cannot compile for the slice's platform."""
  if tpu.chip.platform == "cuda" and importlib.util.find_spec("jax_cuda12_plugin") is None:
    raise ValueError(CUDA_SETUP)
  if tpu.chip.platform == "tpu" and importlib.util.find_spec("libtpu") is None:
    raise ValueError(f"compiling for a TPU needs libtpu: pip install \"jax[tpu]=={jax.__version__}\" (or the "
                     "project's tpu extra: pip install -e \".[tpu]\")")


def torus(chips: int, dims: int) -> list[int]:
  """The shape of a slice of `chips` chips, grown by doubling its last smallest side: 3D tori 2x2x1, 2x2x2, 2x2x4,
  2x4x4, 4x4x4, 4x4x8, ...; 2D ones 1x1, 1x2, 2x2, 2x4, 4x4, 4x8, ..."""
  shape = [2, 2, 1] if dims == 3 and chips >= 4 else [1] * dims
  while math.prod(shape) < chips:
    smallest = min(shape)
    shape[max(i for i, side in enumerate(shape) if side == smallest)] *= 2
  return shape


def slice_mesh(config: Config, tpu: Slice) -> Mesh:
  """The run's (data, fsdp, tensor) mesh over the slice's devices, made without a TPU or GPU."""
  if tpu.chip.platform == "cuda":
    description = topologies.get_topology_desc(platform="cuda", target_config=gpu_target_config(tpu.chip),
                                               topology=tpu.topology)
  else:
    description = topologies.get_topology_desc(platform="tpu", topology_name=tpu.topology, chip_config_name="default",
                                               chips_per_host_bounds=(2, 2, 1), num_slices=1)
  return sharding.make_mesh(config.mesh, description.devices)


def abstract_step(config: Config, mesh: Mesh | None):
  """(the jitted train step, its abstract state and batch) exactly as `qsparse train` builds them on mesh; with no
  mesh, the unsharded step of one device (what program_flops counts)."""
  mc, tc, dc = config.model, config.train, config.data
  tx = make_optimizer(tc)
  graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(mc, rngs=nnx.Rngs(tc.seed))))
  state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params,
           "opt_state": jax.eval_shape(tx.init, params)}
  shardings = None if mesh is None else sharding.train_state_shardings(state, tx, mesh)
  if mesh is not None:
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
  rows = jax.ShapeDtypeStruct((tc.batch_size, dc.seq_len + 1), jnp.int32,
                              sharding=None if mesh is None else sharding.batch_sharding(mesh))
  if dc.format == "instructions":
    batch, loss_fn = {k: rows for k in ("tokens", "loss_mask", "segment_ids", "positions")}, response_loss
  else:
    batch, loss_fn = rows, lm_loss
  step = make_train_step(graphdef, tx, mesh, shardings, loss_fn, microbatches=tc.microbatches)
  return step, state, batch


def model_flops(config: Config) -> dict[str, float]:
  """FLOPs of one train step, summed over the slice: "dense" (6 x the weights every token multiplies, dense as XLA
  multiplies them, x tokens, plus attention's 12 x layers x heads x head dim x sequence per token), "activated" (the
  same with Q-Sparse's kept fraction of each projection, the paper's accounting) and "recompute" (what remat adds:
  one more forward of the blocks, for remat "full" or "dots" alike in matmul FLOPs)."""
  mc, tc, dc = config.model, config.train, config.data
  tokens = tc.batch_size * dc.seq_len
  counts = count_params(mc)
  head = mc.d_model * mc.vocab_size
  dense_blocks = counts["non_embedding"] - 2 * mc.num_layers * mc.d_model - mc.d_model  # less the norm scales
  attention = 12 * mc.num_layers * mc.num_heads * mc.head_size * dc.seq_len
  dense = 6 * (dense_blocks + head) * tokens + attention * tokens
  activated = 6 * (activated_params_per_token(mc) + head) * tokens + attention * tokens
  recompute = 0.0 if mc.remat == "none" else (2 * dense_blocks + attention / 3) * tokens
  return {"dense": dense, "activated": activated, "recompute": recompute}


def program_flops(config: Config) -> float:
  """XLA's count of the FLOPs of one train step of the whole slice: the step's program for the whole batch before it
  is split over devices, lowered for this host (a TPU target's lowering has no cost analysis). Counted without
  micro-batches: XLA counts a loop's body once, whatever its trip count, and the micro-batched step does the same
  FLOPs as the whole batch at once; and with the layers unrolled (model.scan_layers off), for the same reason."""
  whole = dataclasses.replace(config, train=dataclasses.replace(config.train, microbatches=1),
                              model=dataclasses.replace(config.model, scan_layers=False))
  step, state, batch = abstract_step(whole, None)
  cost = step.lower(state, batch).cost_analysis()
  return float((cost[0] if isinstance(cost, list) else cost)["flops"])


@dataclasses.dataclass
class Report:
  tpu: Slice
  mesh_shape: dict
  compile_seconds: float
  fits: bool
  argument_bytes: int = 0
  output_bytes: int = 0
  temp_bytes: int = 0
  alias_bytes: int = 0
  peak_bytes: int = 0  # what one chip holds at once: arguments + temporaries + outputs not aliased to arguments
  flops_per_device: float = 0.0  # program_flops / chips
  model: dict | None = None
  error: str = ""

  @property
  def hbm_fraction(self) -> float:
    return self.peak_bytes / self.tpu.chip.hbm_bytes

  @property
  def roofline_seconds(self) -> float:
    """The step time if every chip ran its compiled FLOPs at peak: a lower bound."""
    return self.flops_per_device / self.tpu.chip.peak_flops

  def mfu_bound(self) -> float:
    """Model FLOPs utilisation at the roofline step time: dense model FLOPs / (chips x peak x roofline time)."""
    return self.model["dense"] / (self.tpu.chips * self.tpu.chip.peak_flops * self.roofline_seconds)

  def lines(self) -> list[str]:
    chip, unit, gib = self.tpu.chip, self.tpu.unit, lambda b: f"{b / GIB:7.2f} GiB"
    out = [slice_line(self.tpu), "mesh: " + " x ".join(f"{k} {v}" for k, v in self.mesh_shape.items()),
           f"compile: {self.compile_seconds:.1f} s"]
    if self.peak_bytes:
      out.append(f"memory per {unit}: state and batch {gib(self.argument_bytes)}, temporaries {gib(self.temp_bytes)}, "
                 f"outputs {gib(self.output_bytes - self.alias_bytes)} (+{gib(self.alias_bytes).strip()} in place), "
                 f"peak {gib(self.peak_bytes)} of {gib(chip.hbm_bytes)}")
    if not self.fits:
      return out + [f"does not fit: {self.error}"]
    out += [(f"FLOPs per step per {unit}: program {self.flops_per_device:.3e}; model "
             f"{self.model['dense'] / self.tpu.chips:.3e} dense (Q-Sparse activated "
             f"{self.model['activated'] / self.tpu.chips:.3e}) + remat recompute "
             f"{self.model['recompute'] / self.tpu.chips:.3e}"),
            f"roofline step time {self.roofline_seconds:.3f} s: MFU at most {self.mfu_bound():.1%}"]
    return out + gpu_memory_note(self.tpu, self.hbm_fraction)


def slice_line(tpu: Slice) -> str:
  chip = tpu.chip
  each = f"{chip.hbm_bytes / GIB:.1f} GiB HBM and {chip.peak_flops / 1e12:.0f} TFLOP/s bf16 each"
  if chip.platform == "tpu":
    return f"slice: {tpu.accelerator_type} = {tpu.chips} {chip.generation} chips ({tpu.topology}), {each}"
  per_host = min(tpu.chips, GPUS_PER_HOST)
  hosts = tpu.chips // per_host
  return (f"slice: {tpu.accelerator_type} = {tpu.chips} {chip.generation.upper()} GPU{'s' if tpu.chips > 1 else ''} "
          f"({hosts} host{'s' if hosts > 1 else ''} of {per_host}, {tpu.topology}), {each}")


def gpu_memory_note(tpu: Slice, fraction: float) -> list[str]:
  """On a GPU, JAX's allocator takes XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.75) of the memory at start: a program
  above that needs it raised."""
  if tpu.chip.platform != "cuda" or fraction <= 0.75:
    return []
  setting = min(0.99, math.ceil(100 * fraction + 3) / 100)
  return [f"note: above JAX's default GPU memory fraction 0.75: run with XLA_PYTHON_CLIENT_MEM_FRACTION={setting:.2f} "
          "(cuBLAS, cuDNN and NCCL need some of the rest)"]


_EXHAUSTED = re.compile(r"RESOURCE_EXHAUSTED.*?\(([\d.]+)([GMK])\) exceeds available HBM \(([\d.]+)G\)", re.S)


def compile_or_exhausted(lowered):
  """(the compiled program, "") or, when XLA finds it does not fit a TPU chip, (None, how much it needed)."""
  try:
    return lowered.compile(), ""
  except Exception as err:  # noqa: BLE001 (XLA reports an over-full chip as a JaxRuntimeError)
    text = str(err)
    if "RESOURCE_EXHAUSTED" not in text:
      raise
    found = _EXHAUSTED.search(text)
    return None, (f"{float(found.group(1)):.1f} {found.group(2)}iB of temporaries per chip, beyond its "
                  f"{float(found.group(3)):.1f} GiB") if found else text.splitlines()[0][:200]


def compile_for(config: Config, accelerator_type: str) -> Report:
  """Compile config's train step for the slice; a step that does not fit is a Report with fits=False."""
  tpu = parse_slice(accelerator_type)
  check_platform(tpu)
  mesh = slice_mesh(config, tpu)
  step, state, batch = abstract_step(config, mesh)
  start = time.perf_counter()
  report = dict(tpu=tpu, mesh_shape=dict(mesh.shape), model=model_flops(config))
  compiled, needed = compile_or_exhausted(step.lower(state, batch))
  if compiled is None:
    return Report(compile_seconds=time.perf_counter() - start, fits=False, error=needed, **report)
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  flops = program_flops(config) / tpu.chips
  peak = (memory.argument_size_in_bytes + memory.temp_size_in_bytes + memory.output_size_in_bytes
          - memory.alias_size_in_bytes)
  return Report(compile_seconds=seconds, fits=peak <= tpu.chip.hbm_bytes, argument_bytes=memory.argument_size_in_bytes,
                output_bytes=memory.output_size_in_bytes, temp_bytes=memory.temp_size_in_bytes,
                alias_bytes=memory.alias_size_in_bytes, peak_bytes=peak, flops_per_device=flops,
                error="" if peak <= tpu.chip.hbm_bytes else
                f"{peak / GIB:.1f} GiB per {tpu.unit}, beyond its {tpu.chip.hbm_bytes / GIB:.1f} GiB", **report)


def advice(config: Config) -> str:
  """What to change, in order, when a step does not fit."""
  mc, tc = config.model, config.train
  steps = [] if mc.remat != "none" else ["model.remat=full"]
  if tc.batch_size % (2 * tc.microbatches) == 0:
    steps.append(f"train.microbatches={2 * tc.microbatches}")
  return "try " + ", then ".join(steps + ["a larger slice"])


def abstract_decode(config: Config, mesh: Mesh, batch: int, context: int):
  """(the jitted decode step, its abstract parameters, KV cache, tokens and positions) on mesh: what each step of
  `qsparse generate` after the prefill runs (Transformer.cached with sparse=True, one token per row, greedy), with the
  cache (init_cache) holding `context` tokens. The weights are split as training splits them (float32, as a
  checkpoint holds them), the cache's rows over data x fsdp and its kv heads over tensor, where those divide."""
  mc = config.model
  if not 1 <= context <= mc.max_seq_len:
    raise ValueError(f"--context {context}: the model's context is 1 to {mc.max_seq_len} tokens")
  graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(mc, rngs=nnx.Rngs(0))))
  cache = jax.eval_shape(lambda: init_cache(mc, batch, context))
  rows = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1)
  rows = rows if rows and batch % math.prod(mesh.shape[a] for a in rows) == 0 else None
  heads = "tensor" if mesh.shape["tensor"] > 1 and mc.kv_heads % mesh.shape["tensor"] == 0 else None
  param_shardings = sharding.param_shardings(params, mesh)
  cache_shardings = jax.tree.map(  # [..., B, S, H, K]: whatever layers init_cache stacks in front stay whole
      lambda x: NamedSharding(mesh, PartitionSpec(*[None] * (x.ndim - 4), rows, None, heads, None)), cache)
  token_sharding = NamedSharding(mesh, PartitionSpec(rows, None))

  def decode_step(params, cache, tokens_b1, positions_b1):
    logits_btv, cache = nnx.merge(graphdef, params).cached(tokens_b1, positions_b1, cache, sparse=True)
    return jnp.argmax(logits_btv[:, -1], axis=-1).astype(jnp.int32), cache

  step = sharding.jit_on_mesh(decode_step, mesh, in_shardings=(param_shardings, cache_shardings, token_sharding,
                                                               token_sharding),
                              out_shardings=(NamedSharding(mesh, PartitionSpec(rows)), cache_shardings),
                              donate_argnums=(1,))
  def place(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

  tokens = jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=token_sharding)
  return step, place(params, param_shardings), place(cache, cache_shardings), tokens, tokens


def device_bytes(tree) -> int:
  """Bytes of one device's shards of a tree of sharded jax.ShapeDtypeStructs."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


@dataclasses.dataclass
class DecodeReport:
  tpu: Slice
  mesh_shape: dict
  batch: int
  context: int
  rows_split: bool  # the batch's rows (and so the cache) split over devices, else every device holds them all
  compile_seconds: float
  weights_bytes: int  # per device
  cache_bytes: int  # per device
  argument_bytes: int
  temp_bytes: int
  output_bytes: int
  alias_bytes: int
  exhausted: str = ""  # a TPU compiler's RESOURCE_EXHAUSTED, shortened
  sparse_bytes: int = 0  # what one decode step reads and writes per device (hlo_traffic), as compiled
  dense_bytes: int = 0  # the same for the dense counterpart (every sparsity 0); 0 when it was not compiled
  untripped: int = 0  # loops of data-dependent length counted once in sparse_bytes (top-K selection's bisection)
  dense_compile_seconds: float = 0.0

  @property
  def peak_bytes(self) -> int:
    return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes

  @property
  def hbm_fraction(self) -> float:
    return self.peak_bytes / self.tpu.chip.hbm_bytes

  @property
  def fits(self) -> bool:
    return not self.exhausted and self.peak_bytes <= self.tpu.chip.hbm_bytes

  @property
  def error(self) -> str:
    return self.exhausted or (f"{self.peak_bytes / GIB:.1f} GiB per {self.tpu.unit}, beyond its "
                              f"{self.tpu.chip.hbm_bytes / GIB:.1f} GiB")

  def lines(self) -> list[str]:
    unit, gib = self.tpu.unit, lambda b: f"{b / GIB:7.2f} GiB"
    out = [slice_line(self.tpu), "mesh: " + " x ".join(f"{k} {v}" for k, v in self.mesh_shape.items()),
           (f"decode step: {self.batch} row{'s' if self.batch > 1 else ''} x 1 token, KV cache of {self.context} "
            f"tokens ({'rows split over data x fsdp' if self.rows_split else 'every row on every ' + unit})"),
           f"compile: {self.compile_seconds:.1f} s",
           f"memory per {unit}: weights {gib(self.weights_bytes)}, KV cache {gib(self.cache_bytes)}"]
    if not self.exhausted:
      out[-1] += (f", temporaries {gib(self.temp_bytes)}, outputs {gib(self.output_bytes - self.alias_bytes)} "
                  f"(+{gib(self.alias_bytes).strip()} in place), peak {gib(self.peak_bytes)} of "
                  f"{gib(self.tpu.chip.hbm_bytes)}")
    if not self.fits:
      return out + [f"does not fit: {self.error}"]
    return out + self.traffic_lines() + gpu_memory_note(self.tpu, self.hbm_fraction) + self.ratio_line()

  def traffic_lines(self) -> list[str]:
    """The bytes a step moves per device, sparse and dense, and per token (a step decodes `batch` of them)."""
    if not self.sparse_bytes:
      return []
    gib = lambda b: f"{b / GIB:.4g} GiB"  # noqa: E731  (4 significant digits: a one-layer step moves 0.02 GiB)
    dense = gib(self.dense_bytes) if self.dense_bytes else "not compiled"
    per_token = (f"sparse {gib(self.sparse_bytes / self.batch)}, dense "
                 f"{gib(self.dense_bytes / self.batch) if self.dense_bytes else dense}")
    loops = (f"; {self.untripped} loop{'s' if self.untripped > 1 else ''} of data-dependent length (top-K "
             "selection's bisection) counted once" if self.untripped else "")
    return [f"bytes per step per {self.tpu.unit}: sparse {gib(self.sparse_bytes)}, dense {dense} (weights "
            f"{gib(self.weights_bytes)}, KV cache {gib(self.cache_bytes)}; the compiled programs' reads + writes, "
            f"cache attention over all {self.context} tokens{loops})",
            f"bytes per token: {per_token} (dense compiled in {self.dense_compile_seconds:.1f} s)"]

  def ratio_line(self) -> list[str]:
    return [f"decode_bytes_sparse_vs_dense: {self.sparse_bytes / self.dense_bytes:.3f}"] if self.dense_bytes else []


def dense_counterpart(config: Config) -> Config:
  """config with every sparsity site at 0: the dense model whose decode step a Q-Sparse one is compared with."""
  return dataclasses.replace(config, model=config.model.with_sparsity(0.0))


def cache_loop_trips(cache, context: int):
  """hlo_traffic's trips_of for a decode step over a KV cache of `context` tokens: cache_attention walks the cache in
  blocks of CACHE_BLOCK entries up to the furthest position, a loop of data-dependent length; its state holds the
  cache as one device has it ([B, S, H, K], in some dtype), and it is counted context / CACHE_BLOCK times, as at the
  last position of a full cache. Other loops without a known trip count: None (counted once)."""
  shapes = {tuple(x.sharding.shard_shape(x.shape)[-4:]) for x in jax.tree.leaves(cache)}

  def trips_of(instruction: hlo_traffic.Instruction) -> int | None:
    for element in hlo_traffic.tuple_elements(instruction.shape):
      dims = re.match(r"[a-z0-9]+\[([\d,]*)\]", element)
      if dims and tuple(int(d) for d in filter(None, dims.group(1).split(","))) in shapes:
        return context // CACHE_BLOCK
    return None

  return trips_of


def decode_traffic(compiled, cache, context: int) -> hlo_traffic.Traffic:
  """The bytes one compiled decode step (abstract_decode's) reads and writes per device (hlo_traffic.traffic)."""
  return hlo_traffic.traffic(compiled.as_text(), cache_loop_trips(cache, context))


def compile_decode(config: Config, accelerator_type: str, batch: int, context: int | None = None) -> DecodeReport:
  """Compile generate's decode step for the slice at `batch` rows and a KV cache of `context` tokens (default: the
  model's whole context), and, when it fits, its dense counterpart's (dense_counterpart): the bytes each step moves
  (decode_traffic) are what a memory-bound decode step's speed follows."""
  tpu = parse_slice(accelerator_type)
  check_platform(tpu)
  if batch < 1:
    raise ValueError(f"--batch {batch}: at least one row")
  context = config.model.max_seq_len if context is None else context
  mesh = slice_mesh(config, tpu)
  step, params, cache, tokens, positions = abstract_decode(config, mesh, batch, context)
  start = time.perf_counter()
  compiled, needed = compile_or_exhausted(step.lower(params, cache, tokens, positions))
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis() if compiled is not None else None
  sizes = {f"{k}_bytes": getattr(memory, f"{k}_size_in_bytes", 0) for k in ("argument", "temp", "output", "alias")}
  report = DecodeReport(tpu=tpu, mesh_shape=dict(mesh.shape), batch=batch, context=context,
                        rows_split=tokens.sharding.spec[0] is not None, compile_seconds=seconds,
                        weights_bytes=device_bytes(params), cache_bytes=device_bytes(cache), exhausted=needed, **sizes)
  if compiled is None:
    return report
  sparse = decode_traffic(compiled, cache, context)
  report = dataclasses.replace(report, sparse_bytes=sparse.bytes, untripped=sparse.untripped)
  if dense_counterpart(config) == config:  # a dense model is its own counterpart
    return dataclasses.replace(report, dense_bytes=sparse.bytes)
  start = time.perf_counter()
  step, params, cache, tokens, positions = abstract_decode(dense_counterpart(config), mesh, batch, context)
  dense, _ = compile_or_exhausted(step.lower(params, cache, tokens, positions))
  return dataclasses.replace(report, dense_compile_seconds=time.perf_counter() - start,
                             dense_bytes=0 if dense is None else decode_traffic(dense, cache, context).bytes)
