"""The sparse core inside a mesh: each device selects the top-K of its own rows (parallel.rowwise), so the compiled
sharded train step has no collective inside a selection's loops and gathers no activation rows across the batch's
devices; it computes the single-device step (method.md §1, §2)."""

import dataclasses
import itertools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsparse_jax.config import TrainConfig
from qsparse_jax.nn.model import ModelConfig
from qsparse_jax.parallel import sharding
from qsparse_jax.training.optimizer import make_optimizer
from qsparse_jax.training.step import init_train_state, make_train_step

# Widths chosen so that no activation [2, 16, ...] (8 rows over 4 batch devices) has a parameter's shape.
CFG = ModelConfig(vocab_size=64, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=128,
                  max_seq_len=16).with_sparsity(0.5)
COLLECTIVE = re.compile(r"\b(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)(-start)?\(")


def computations(hlo: str) -> dict[str, list[str]]:
  """HLO text -> {computation name: its instruction lines}."""
  comps, current = {}, None
  for line in hlo.splitlines():
    header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if header:
      current = comps.setdefault(header.group(1), [])
    elif current is not None:
      current.append(line)
  return comps


def loop_computations(comps: dict[str, list[str]]) -> set[str]:
  """Every computation that runs inside a selection's while loops (ops.selection.row_thresholds: its bisections and
  its row blocks; not a scan over layers): bodies and conditions, and what they call, transitively."""
  called = re.compile(r"\b(?:body|condition|calls|to_apply|branch_computations|true_computation|"
                      r"false_computation)=\{?%?([\w.\-, %]+)\}?")
  found = set()
  todo = [name for lines in comps.values() for line in lines if " while(" in line and "row_thresholds" in line
          for name in re.findall(r"(?:body|condition)=%?([\w.\-]+)", line)]
  while todo:
    name = todo.pop()
    if name in found or name not in comps:
      continue
    found.add(name)
    for line in comps[name]:
      for group in called.findall(line):
        todo.extend(n.strip().lstrip("%") for n in group.split(","))
  return found


def group_size(line: str) -> int:
  """Devices per replica group of a collective's HLO line, in each of the printed forms."""
  iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", line)
  if iota:
    return int(iota.group(2))
  listed = re.search(r"replica_groups=\{\{([\d,]+)\}", line)
  if listed:
    return len(listed.group(1).split(","))
  mesh = re.search(r"replica_groups=mesh\[([^\]]*)\](?: \{([^}]*)\})?", line)  # no {axes}: the whole mesh
  sizes = dict(re.findall(r"'(\w+)'=(\d+)", mesh.group(1)))
  axes = re.findall(r"'(\w+)'", mesh.group(2)) if mesh.group(2) is not None else sizes
  return math.prod(int(sizes[a]) for a in axes)


def parameter_shapes(params, mesh) -> set[tuple[int, ...]]:
  """Each parameter's shape with every axis either whole or split as its sharding splits it: what an FSDP gather
  of a parameter shard (fully or over some of its mesh axes) produces."""
  shapes = set()
  for leaf in jax.tree.leaves(params):
    spec = tuple(leaf.sharding.spec) + (None,) * (leaf.ndim - len(leaf.sharding.spec))
    options = []
    for size, axes in zip(leaf.shape, spec):
      axes = axes if isinstance(axes, tuple) else (axes,) if axes else ()
      options.append({size, size // math.prod(mesh.shape[a] for a in axes)})
    shapes |= set(itertools.product(*options))
  return shapes


def collectives(hlo: str):
  """(op, result shape, group size, inside a loop) of every collective of the compiled program."""
  comps = computations(hlo)
  in_loops = loop_computations(comps)
  for name, lines in comps.items():
    for line in lines:
      match = COLLECTIVE.search(line)
      if match:
        shape = re.search(r"= \(?\w+\[([\d,]*)\]", line)
        dims = tuple(int(d) for d in shape.group(1).split(",") if d) if shape else ()
        yield match.group(1), dims, group_size(line), name in in_loops


@pytest.fixture(scope="module")
def setup():
  tx = make_optimizer(TrainConfig(steps=10, warmup_steps=1))
  graphdef, state = init_train_state(CFG, tx, seed=0)
  tokens = jax.random.randint(jax.random.key(0), (8, 17), 0, 64)
  new_state, metrics = two_steps(make_train_step(graphdef, tx), jax.tree.map(jnp.copy, state), tokens)
  return tx, graphdef, state, tokens, jax.tree.map(np.asarray, (new_state["params"], metrics["loss"]))


def two_steps(step, state, tokens):
  """Two train steps (the first one's learning rate is 0, the end of warm-up's start): (state, second metrics)."""
  state, _ = step(state, tokens)
  return step(state, tokens)


@pytest.mark.parametrize("shape, scan", [((1, 4, 2), False), ((2, 4, 1), False), ((1, 4, 2), True)],
                         ids=["fsdp4-tensor2", "data2-fsdp4", "fsdp4-tensor2-scan"])  # (data, fsdp, tensor)
def test_sharded_step_selects_per_shard(shape, scan, setup):
  tx, graphdef, state, tokens, (params_1, loss_1) = setup
  if scan:  # the blocks as one lax.scan (the same parameters and step): one copy of each site in the program
    graphdef, _ = init_train_state(dataclasses.replace(CFG, scan_layers=True), tx, seed=0)
  mesh = sharding.make_mesh(sharding.MeshConfig(*shape))
  sharded = sharding.shard_train_state(jax.tree.map(jnp.copy, state), tx, mesh)  # the step donates its state
  tokens_s = jax.device_put(tokens, sharding.batch_sharding(mesh))
  step = make_train_step(graphdef, tx, mesh, jax.tree.map(lambda x: x.sharding, sharded))
  hlo = step.lower(sharded, tokens_s).compile().as_text()
  found = list(collectives(hlo))
  assert "row_thresholds" in hlo and found

  # No collective inside a loop: neither the bisection's counts nor its stop condition cross devices.
  assert not [c for c in found if c[3]], [c for c in found if c[3]]
  # Every all-gather across the batch's devices (the group of all devices but "tensor"'s) gathers a parameter
  # shard for FSDP; none gathers activation rows (which have the batch's 8 / 4 = 2 rows and T = 16).
  params = parameter_shapes(sharded["params"], mesh)
  batch_devices = shape[0] * shape[1]
  gathers = [c for c in found if c[0] == "all-gather"]
  across_batch = [c for c in gathers if c[2] != shape[2]]
  assert across_batch and all(dims in params for _, dims, _, _ in across_batch), \
      [c for c in across_batch if c[1] not in params]
  # With a tensor axis, the inputs of the output and down projections arrive split over it (heads, mlp): the one
  # activation gather of the step is of those rows, whole for their selection, once per site and layer in the
  # forward pass (the straight-through backward passes the cotangent in its own layout).
  over_tensor = [c for c in gathers if c[2] == shape[2] and c[1] not in params]
  assert all(c[1][:2] == (8 // batch_devices, 16) for c in over_tensor), over_tensor
  assert len(over_tensor) == (2 * (1 if scan else CFG.num_layers) if shape[2] > 1 else 0), over_tensor

  new_state, metrics = two_steps(step, sharded, tokens_s)
  # float32: the sharded matmuls and reductions sum in another order, a few ulps of the O(1) loss; the top-K masks
  # are exact. Adam moves each entry by about lr·m/√v: equal to float32 rounding where |g| stands above that
  # rounding, but an entry whose gradient is at the rounding's level (measured: 1 of 8192 entries of one matrix)
  # may move by up to lr (3e-3, its first step after warm-up) in one run and less in the other.
  np.testing.assert_allclose(metrics["loss"], loss_1, rtol=1e-5)
  lr = TrainConfig().learning_rate
  for got, want in zip(jax.tree.leaves(new_state["params"]), jax.tree.leaves(params_1)):
    got = np.asarray(got)
    np.testing.assert_allclose(got, want, rtol=0, atol=2 * lr)
    assert np.mean(~np.isclose(got, want, rtol=1e-5, atol=1e-6)) < 1e-3
