"""qsparse_jax.nn.attention_kernels.attention: values and gradients against NumPy, and the TPU program it compiles to.

On the CPU: the function ("auto": the XLA path here) and splash attention in Pallas's interpreter ("pallas": the
wrapper's padding, scaling, head grouping and segment ids, run without a TPU) against a float64 NumPy reference
(softmax over the keys s <= t of the query's own segment, gradients written out by hand), for MHA and GQA, with
and without segment ids, in float32 and bfloat16. T = 100 and K = 64 are not multiples of 128, so splash pads both.

On a TPU v5p, deviceless (libtpu's topologies, in a subprocess started when this module's tests start, so that it
compiles while the CPU tests run; libtpu allows one process per machine unless ALLOW_MULTIPLE_LIBTPU_LOAD is set
before it loads): forward + backward at a training shape (B = 8, T = 2048, N = 32, K = 128, bfloat16) on one chip
and per shard over a (data 1, fsdp 2, tensor 2) mesh of the slice's four chips; the compiled program holds splash's
three kernels (forward, dq, dkv: `tpu_custom_call`) and XLA's temporaries stay far below the float32 scores the XLA
path holds, B·N·T·T·4 bytes per chip (which the XLA path's own compile shows).

    python tests/test_attention_kernels.py        # the TPU cases alone, one JSON line each
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsparse_jax.nn.attention_kernels import attention

CUSTOM_CALL = 'custom_call_target="tpu_custom_call"'
SEGMENTS = (0,) * 40 + (1,) * 35 + (2,) * 25  # T = 100: three packed sequences of one row


def reference(q, k, v, seg, dout):
  """(out, dq, dk, dv) in float64: out = softmax(q kᵀ / sqrt(K), over keys s <= t in t's segment) v, and the
  gradients of sum(out · dout). q [B, T, N, K], k and v [B, T, H, K], query head n reads kv head n // (N / H)."""
  q, k, v, dout = (np.asarray(x, np.float64) for x in (q, k, v, dout))
  b, t, n, kd = q.shape
  g = n // k.shape[2]
  k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)  # kv head of each query head
  scale = kd ** -0.5
  visible = np.tril(np.ones((t, t), bool))[None]
  if seg is not None:
    visible = visible & (seg[:, :, None] == seg[:, None, :])
  s = np.einsum("btnk,bsnk->bnts", q, k) * scale
  s = np.where(visible[:, None], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  out = np.einsum("bnts,bsnk->btnk", p, v)
  dp = np.einsum("btnk,bsnk->bnts", dout, v)
  ds = p * (dp - (dp * p).sum(-1, keepdims=True))
  dq = np.einsum("bnts,bsnk->btnk", ds, k) * scale
  dk = np.einsum("bnts,btnk->bsnk", ds, q) * scale
  dv = np.einsum("bnts,btnk->bsnk", p, dout)
  fold = lambda x: x.reshape(b, t, n // g, g, kd).sum(3)
  return out, dq, fold(dk), fold(dv)


# float32: the XLA path and splash both accumulate in float32 (about 1e-7 per element); 1e-5 of the largest entry
# leaves room for sums over 100 keys. bfloat16 (8 bits of mantissa, 2^-8 = 0.0039 relative): the output is rounded
# to bfloat16 once and the softmax weights once more before P·V, the gradients a few times more on the way back
# (dP, dS, and splash's bfloat16 residuals): 2% and 4% of the largest entry, five and ten bfloat16 ulps.
TOLERANCE = {"float32": (1e-5, 1e-5), "bfloat16": (2e-2, 4e-2)}


@pytest.mark.parametrize("backend, dtype, heads, segments", [
    ("auto", "float32", (4, 4), False), ("auto", "float32", (4, 4), True), ("auto", "float32", (4, 2), False),
    ("auto", "float32", (4, 2), True), ("auto", "bfloat16", (4, 4), True), ("auto", "bfloat16", (4, 2), False),
    ("pallas", "float32", (4, 2), True), ("pallas", "float32", (4, 4), False), ("pallas", "bfloat16", (4, 2), True),
])
def test_values_and_gradients_match_numpy(backend, dtype, heads, segments):
  (n, h), b, t, kd = heads, 2, len(SEGMENTS), 64
  rng = np.random.default_rng(hash((n, h, segments)) % 2**32)
  q, k, v = (jnp.asarray(rng.normal(size=shape), dtype) for shape in ((b, t, n, kd), (b, t, h, kd), (b, t, h, kd)))
  dout = jnp.asarray(rng.normal(size=(b, t, n, kd)), jnp.float32)
  seg = jnp.asarray(np.stack([SEGMENTS, SEGMENTS[::-1]]), jnp.int32) if segments else None

  def loss(q, k, v):
    out = attention(q, k, v, seg, backend=backend)
    return jnp.sum(out.astype(jnp.float32) * dout), out

  grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  want = reference(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                   None if seg is None else np.asarray(seg), dout)
  assert out.dtype == jnp.dtype(dtype) and out.shape == (b, t, n, kd)
  tol_out, tol_grad = TOLERANCE[dtype]
  for name, got, ref, tol in zip(("out", "dq", "dk", "dv"), (out, *grads), want, (tol_out,) + (tol_grad,) * 3):
    err = np.max(np.abs(np.asarray(got, np.float64) - ref)) / np.max(np.abs(ref))
    assert err < tol, f"{name}: max error {err:.2e} of the largest entry, tolerance {tol:.0e}"


def test_the_cpu_program_is_the_xla_path_and_bad_shapes_are_named():
  q = jax.ShapeDtypeStruct((2, 256, 4, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, 256, 2, 128), jnp.bfloat16)
  text = jax.jit(attention).lower(q, kv, kv).compile().as_text()
  assert "custom_call" not in text
  with pytest.raises(ValueError, match="H dividing N"):
    attention(jnp.zeros((1, 8, 3, 16)), jnp.zeros((1, 8, 2, 16)), jnp.zeros((1, 8, 2, 16)))
  with pytest.raises(ValueError, match="backend must be one of"):
    attention(jnp.zeros((1, 8, 2, 16)), jnp.zeros((1, 8, 2, 16)), jnp.zeros((1, 8, 2, 16)), backend="splash")


# ---- TPU v5p, deviceless (in a subprocess) ----

TRAIN = {"b": 8, "t": 2048, "n": 32, "k": 128}


def tpu_cases():
  """(name, mesh shape (data, fsdp, tensor) over the slice's first chips, backend, B, T, N, H, K, segment ids or
  not, traced under jax.set_mesh or not). The GQA cases group 4 query heads per kv head, as Llama-2-70B does."""
  b, t, n, k = TRAIN.values()
  return [
      ("one chip GQA H=8 segment ids", (1, 1, 1), "auto", b, t, n, 8, k, True, True),
      ("mesh fsdp=2 tensor=2 GQA H=8 segment ids", (1, 2, 2), "auto", b, t, n, 8, k, True, True),
      ("one chip GQA H=8 segment ids, XLA path", (1, 1, 1), "xla", b, t, n, 8, k, True, True),
      ("one chip padded T=1000 K=64", (1, 1, 1), "auto", 1, 1000, 4, 2, 64, True, True),
      ("4 chips by argument shardings, no jax.set_mesh: XLA path", (1, 4, 1), "auto", 4, 256, 4, 2, 128, True, False),
  ]


def compile_tpu_case(mesh_shape, backend, b, t, n, h, k, segments, set_mesh):
  """(tpu_custom_calls, temp bytes) of jit(grad of sum(attention²)) over q, k, v on a v5p:2x2x1 slice's chips."""
  from jax.experimental import topologies
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  topology = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1", chip_config_name="default",
                                          chips_per_host_bounds=(2, 2, 1), num_slices=1)
  chips = int(np.prod(mesh_shape))
  mesh = Mesh(np.array(topology.devices[:chips]).reshape(mesh_shape), ("data", "fsdp", "tensor"))
  heads = "tensor" if mesh_shape[2] > 1 else None
  qkv_spec, ids_spec = PartitionSpec(("data", "fsdp"), None, heads, None), PartitionSpec(("data", "fsdp"), None)
  spec = lambda shape, dtype, s: jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, s))
  args = [spec((b, t, n, k), jnp.bfloat16, qkv_spec), spec((b, t, h, k), jnp.bfloat16, qkv_spec),
          spec((b, t, h, k), jnp.bfloat16, qkv_spec), spec((b, t), jnp.int32, ids_spec)]

  def step(q, kk, v, ids):
    loss = lambda q, kk, v: jnp.sum(attention(q, kk, v, ids if segments else None,
                                              backend=backend).astype(jnp.float32) ** 2)
    return jax.grad(loss, argnums=(0, 1, 2))(q, kk, v)

  if set_mesh:
    with jax.set_mesh(mesh):
      compiled = jax.jit(step).lower(*args).compile()
  else:
    compiled = jax.jit(step).lower(*args).compile()
  return compiled.as_text().count(CUSTOM_CALL), compiled.memory_analysis().temp_size_in_bytes


def run_tpu_cases() -> None:
  """One JSON line per case: name, kernels found, temp bytes per chip, B·N·T·T·4 per chip, or the error."""
  for name, mesh_shape, backend, b, t, n, h, k, segments, set_mesh in tpu_cases():
    scores = (b // (mesh_shape[0] * mesh_shape[1])) * (n // mesh_shape[2]) * t * t * 4
    try:
      kernels, temp = compile_tpu_case(mesh_shape, backend, b, t, n, h, k, segments, set_mesh)
      print(json.dumps({"name": name, "kernels": kernels, "temp": temp, "scores": scores, "error": None}), flush=True)
    except Exception as e:  # noqa: BLE001 -- a failed compile is a result to report
      print(json.dumps({"name": name, "error": f"{type(e).__name__}: {str(e)[:500]}"}), flush=True)


@pytest.fixture(scope="module", autouse=True)
def tpu_compiles(request):
  """The TPU cases' subprocess, started with this module's first test so that it compiles while the CPU tests run
  (None when libtpu is not installed or no TPU test is selected)."""
  if importlib.util.find_spec("libtpu") is None or not any("tpu_results" in getattr(item, "fixturenames", ())
                                                           for item in request.session.items):
    yield None
    return
  env = {**os.environ, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "TPU_SKIP_MDS_QUERY": "1", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.Popen([sys.executable, os.path.abspath(__file__)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=env)
  yield proc
  if proc.poll() is None:
    proc.kill()
    proc.communicate()


@pytest.fixture(scope="module")
def tpu_results(tpu_compiles):
  if tpu_compiles is None:
    pytest.skip("libtpu is not installed (the test extra installs it with jax[tpu] on x86-64 Linux)")
  stdout, stderr = tpu_compiles.communicate(timeout=600)
  lines = {r["name"]: r for r in (json.loads(line) for line in stdout.splitlines() if line.startswith("{"))}
  assert tpu_compiles.returncode == 0 and lines, \
      f"the TPU compile subprocess failed:\n{stdout[-3000:]}\n{stderr[-3000:]}"
  failed = {name: r["error"] for name, r in lines.items() if r["error"]}
  assert not failed, failed
  return lines


@pytest.mark.parametrize("name", [c[0] for c in tpu_cases() if c[2] == "auto" and c[-1]])
def test_splash_kernels_compile_for_v5p_without_the_scores(tpu_results, name):
  r = tpu_results[name]
  print(f"{name}: {r['kernels']} kernels, temp {r['temp'] / 2**20:.0f} MiB per chip, XLA scores "
        f"{r['scores'] / 2**20:.0f} MiB")
  assert r["kernels"] == 3  # forward, dq, dkv
  assert r["temp"] < r["scores"] / 4


def test_the_xla_path_holds_the_scores_and_argument_sharded_programs_take_it(tpu_results):
  splash, xla = (tpu_results[f"one chip GQA H=8 segment ids{suffix}"] for suffix in ("", ", XLA path"))
  print(f"temp per chip at B=8 T=2048 N=32 H=8 K=128 bf16: splash {splash['temp'] / 2**20:.0f} MiB, "
        f"XLA path {xla['temp'] / 2**20:.0f} MiB")
  assert xla["kernels"] == 0 and xla["temp"] >= xla["scores"]
  assert splash["temp"] < xla["temp"] / 5
  assert tpu_results["4 chips by argument shardings, no jax.set_mesh: XLA path"]["kernels"] == 0


if __name__ == "__main__":
  run_tpu_cases()
