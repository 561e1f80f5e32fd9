"""Will it fit? The train step compiled ahead of time for a TPU slice, on any machine (`qsparse compile`).

libtpu compiles for a TPU topology without a TPU (jax.experimental.topologies): the program is the one `qsparse
train` would run there (the same mesh, shardings, remat and micro-batches), and XLA's own memory and cost analyses
say per chip how many bytes it needs and how many FLOPs it does. A run that does not fit fails to compile with
RESOURCE_EXHAUSTED; that too is reported, with what to change.

Accelerator types are Cloud TPU's: v4-32, v5p-128 (their number counts TensorCores, two per chip), v5litepod-16 or
v5e-16, v6e-64 (their number counts chips).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental import topologies
from jax.sharding import Mesh

from qsparse_jax.config import Config
from qsparse_jax.nn.model import Transformer, activated_params_per_token, count_params
from qsparse_jax.parallel import sharding
from qsparse_jax.training.optimizer import make_optimizer
from qsparse_jax.training.step import lm_loss, make_train_step, response_loss

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation: HBM per chip, peak dense bfloat16 FLOP/s per chip, and how its accelerator types count."""

  generation: str
  hbm_bytes: int
  peak_flops: float
  cores_per_chip: int  # what the number in "v5p-128" counts per chip: 2 TensorCores (v4, v5p) or 1 (v5e, v6e)
  dims: int  # 3 for the 3D tori of v4 / v5p, 2 for v5e / v6e


CHIPS = {
    "v4": Chip("v4", 32 * GIB, 275e12, 2, 3),
    "v5e": Chip("v5e", 16 * GIB, 197e12, 1, 2),
    "v5p": Chip("v5p", 95 * GIB, 459e12, 2, 3),
    "v6e": Chip("v6e", 32 * GIB, 918e12, 1, 2),
}
ALIASES = {"v5litepod": "v5e"}


@dataclasses.dataclass(frozen=True)
class Slice:
  accelerator_type: str
  chip: Chip
  chips: int
  topology: str  # jax.experimental.topologies' name, e.g. "v5p:4x4x4"


def parse_slice(accelerator_type: str) -> Slice:
  """v5p-128 -> 64 v5p chips as "v5p:4x4x4". ValueError naming the known generations for anything else."""
  found = re.fullmatch(r"(v[0-9a-z]+)-(\d+)", accelerator_type.strip().lower())
  generation = ALIASES.get(found.group(1), found.group(1)) if found else None
  if generation not in CHIPS:
    raise ValueError(f"--topology {accelerator_type!r} is not a Cloud TPU accelerator type; expected GENERATION-N with "
                     f"GENERATION one of {', '.join(CHIPS)} (or v5litepod), e.g. v5p-128 or v6e-64")
  chip = CHIPS[generation]
  number = int(found.group(2))
  chips = number // chip.cores_per_chip
  if number % chip.cores_per_chip or chips < 1 or chips & (chips - 1):
    raise ValueError(f"--topology {accelerator_type!r}: {generation} slices have a power-of-two number of chips"
                     f"{' (the type counts 2 TensorCores per chip)' if chip.cores_per_chip == 2 else ''}")
  return Slice(accelerator_type, chip, chips, f"{generation}:{'x'.join(map(str, torus(chips, chip.dims)))}")


def torus(chips: int, dims: int) -> list[int]:
  """The shape of a slice of `chips` chips, grown by doubling its last smallest side: 3D tori 2x2x1, 2x2x2, 2x2x4,
  2x4x4, 4x4x4, 4x4x8, ...; 2D ones 1x1, 1x2, 2x2, 2x4, 4x4, 4x8, ..."""
  shape = [2, 2, 1] if dims == 3 and chips >= 4 else [1] * dims
  while math.prod(shape) < chips:
    smallest = min(shape)
    shape[max(i for i, side in enumerate(shape) if side == smallest)] *= 2
  return shape


def slice_mesh(config: Config, tpu: Slice) -> Mesh:
  """The run's (data, fsdp, tensor) mesh over the slice's devices, made without a TPU."""
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
  FLOPs as the whole batch at once."""
  whole = dataclasses.replace(config, train=dataclasses.replace(config.train, microbatches=1))
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
    chip, gib = self.tpu.chip, lambda b: f"{b / GIB:7.2f} GiB"
    out = [f"slice: {self.tpu.accelerator_type} = {self.tpu.chips} {chip.generation} chips ({self.tpu.topology}), "
           f"{chip.hbm_bytes / GIB:.1f} GiB HBM and {chip.peak_flops / 1e12:.0f} TFLOP/s bf16 each",
           "mesh: " + " x ".join(f"{k} {v}" for k, v in self.mesh_shape.items()),
           f"compile: {self.compile_seconds:.1f} s"]
    if not self.fits:
      return out + [f"does not fit: {self.error}"]
    out += [f"memory per chip: state and batch {gib(self.argument_bytes)}, temporaries {gib(self.temp_bytes)}, "
            f"outputs {gib(self.output_bytes - self.alias_bytes)} (+{gib(self.alias_bytes).strip()} in place), "
            f"peak {gib(self.peak_bytes)} of {gib(chip.hbm_bytes)}",
            f"FLOPs per step per chip: program {self.flops_per_device:.3e}; model "
            f"{self.model['dense'] / self.tpu.chips:.3e} dense (Q-Sparse activated "
            f"{self.model['activated'] / self.tpu.chips:.3e}) + remat recompute "
            f"{self.model['recompute'] / self.tpu.chips:.3e}",
            f"roofline step time {self.roofline_seconds:.3f} s: MFU at most {self.mfu_bound():.1%}"]
    return out


_EXHAUSTED = re.compile(r"RESOURCE_EXHAUSTED.*?\(([\d.]+)([GMK])\) exceeds available HBM \(([\d.]+)G\)", re.S)


def compile_for(config: Config, accelerator_type: str) -> Report:
  """Compile config's train step for the slice; a step that does not fit is a Report with fits=False."""
  tpu = parse_slice(accelerator_type)
  mesh = slice_mesh(config, tpu)
  step, state, batch = abstract_step(config, mesh)
  start = time.perf_counter()
  report = dict(tpu=tpu, mesh_shape=dict(mesh.shape), model=model_flops(config))
  try:
    compiled = step.lower(state, batch).compile()
  except Exception as err:  # noqa: BLE001 (XLA reports an over-full chip as a JaxRuntimeError)
    text = str(err)
    if "RESOURCE_EXHAUSTED" not in text:
      raise
    found = _EXHAUSTED.search(text)
    needed = (f"{float(found.group(1)):.1f} {found.group(2)}iB of temporaries per chip, beyond its "
              f"{float(found.group(3)):.1f} GiB") if found else text.splitlines()[0][:200]
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
                f"{peak / GIB:.1f} GiB per chip, beyond its {tpu.chip.hbm_bytes / GIB:.1f} GiB", **report)


def advice(config: Config) -> str:
  """What to change, in order, when a step does not fit."""
  mc, tc = config.model, config.train
  steps = [] if mc.remat != "none" else ["model.remat=full"]
  if tc.batch_size % (2 * tc.microbatches) == 0:
    steps.append(f"train.microbatches={2 * tc.microbatches}")
  return "try " + ", then ".join(steps + ["a larger slice"])
