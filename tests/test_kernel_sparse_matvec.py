"""sparse_matvec (XLA fast path, the Pallas TPU kernel and the Mosaic GPU kernel in interpret mode) against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels import dispatch, gpu_verified
from pallas_kernels.sparse_matvec import BlockSizes, cpu_reads, sparse_matvec, sparse_matvecs, topk_values_indices
from pallas_kernels.sparse_matvec import ops as smv_ops
from pallas_kernels.sparse_matvec.kernel_gpu import GpuBlockSizes, interpret_params, races_found, sparse_matvec_gpu
from pallas_kernels.sparse_matvec.ops import gpu_block_sizes, kept_indices
from pallas_kernels.sparse_matvec.reference import sparse_matvec_reference
from pallas_kernels.ternary_matmul import pack_ternary

# Accumulation is float32 in every path; the sum order differs (steps, groups of rows), so float32 results agree to
# a few ulps of the row norms. bfloat16 inputs are exact in float32, the only rounding is the final cast to
# bfloat16 (8 bits of mantissa: 2^-8 relative).
TOLERANCE = {jnp.float32: dict(rtol=2e-5, atol=2e-5), jnp.bfloat16: dict(rtol=1e-2, atol=1e-2)}


def np_sparse_matvec(values, indices, w):
  """y[b] = Σ_j values[b, j] · w[indices[b, j]], in float64."""
  w64 = np.asarray(w, np.float64)
  return np.stack([np.asarray(v, np.float64) @ w64[i] for v, i in zip(values, indices)])


def random_problem(seed, b, d, n, k, dtype):
  rng = np.random.default_rng(seed)
  w = jnp.asarray(rng.standard_normal((d, n)), dtype)
  indices = np.stack([np.sort(rng.choice(d, k, replace=False)) for _ in range(b)]).astype(np.int32)
  values = jnp.asarray(rng.standard_normal((b, k)), dtype)
  return values, jnp.asarray(indices), w


@pytest.mark.parametrize("backend", ["xla", "pallas"])
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16), b=st.sampled_from([1, 3, 16]), d=st.sampled_from([16, 96, 256]),
       n=st.sampled_from([128, 200, 384]), keep=st.sampled_from([1 / 16, 0.4, 1.0]),
       dtype=st.sampled_from([jnp.float32, jnp.bfloat16]))
def test_sparse_matvec_matches_numpy(backend, seed, b, d, n, keep, dtype):
  k = max(1, round(keep * d))
  values, indices, w = random_problem(seed, b, d, n, k, dtype)
  y = sparse_matvec(values, indices, w, backend=backend)
  assert y.shape == (b, n) and y.dtype == dtype
  want = np_sparse_matvec(values.astype(jnp.float32), indices, w.astype(jnp.float32))
  np.testing.assert_allclose(np.asarray(y, np.float32), want, **TOLERANCE[dtype])
  np.testing.assert_allclose(np.asarray(sparse_matvec_reference(values, indices, w)), want,
                             **TOLERANCE[jnp.float32])


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_padding_repeated_rows_and_zero_values(backend):
  """Zero values contribute nothing wherever they point (how callers pad); an index may repeat across rows."""
  values, indices, w = random_problem(0, 2, 64, 128, 10, jnp.float32)
  values = values.at[1].set(0.0)
  y = sparse_matvec(values, indices.at[0, 3].set(indices[0, 2]), w, backend=backend)
  np.testing.assert_array_equal(np.asarray(y[1]), np.zeros(128, np.float32))
  want = np_sparse_matvec(values, indices.at[0, 3].set(indices[0, 2]), w)
  np.testing.assert_allclose(np.asarray(y), want, **TOLERANCE[jnp.float32])


def test_topk_values_indices_is_the_dense_topk_in_gathered_form():
  x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 300)), jnp.float32)
  x = x.at[0, :20].set(1.5).at[0, 100:120].set(-1.5)  # ties: the lower indices win
  values, indices = topk_values_indices(x, 30)
  a = np.abs(np.asarray(x))
  for row in range(4):
    want = np.sort(np.argsort(-a[row], kind="stable")[:30])
    np.testing.assert_array_equal(np.asarray(indices[row]), want)
    np.testing.assert_array_equal(np.asarray(values[row]), np.asarray(x)[row, want])
  w = jnp.asarray(np.random.default_rng(2).standard_normal((300, 128)), jnp.float32)
  masked = np.zeros_like(np.asarray(x))
  np.put_along_axis(masked, np.asarray(indices), np.asarray(values), axis=1)
  np.testing.assert_allclose(np.asarray(sparse_matvec(values, indices, w)), masked @ np.asarray(w),
                             rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("d", [5, 64, 200, 4161])
def test_kept_indices_are_the_positions_of_the_mask(d):
  rng = np.random.default_rng(d)
  k = max(1, d // 3)
  mask = np.zeros((3, d), bool)
  for row in range(3):
    mask[row, rng.choice(d, k, replace=False)] = True
  got = np.asarray(jax.jit(kept_indices, static_argnums=1)(jnp.asarray(mask), k))
  np.testing.assert_array_equal(got, np.stack([np.flatnonzero(m) for m in mask]))


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_sparse_matvecs_equal_one_matvec_per_weight(backend):
  values, indices, w = random_problem(3, 2, 256, 384, 100, jnp.float32)
  ws = (w[:, :128], w, w[:, 128:256] * 2)  # the widths of q, k and v or of gate and up may differ
  ys = sparse_matvecs(values, indices, ws, backend=backend)
  for y, w_dn in zip(ys, ws):
    np.testing.assert_allclose(np.asarray(y), np_sparse_matvec(values, indices, w_dn), **TOLERANCE[jnp.float32])
  with pytest.raises(ValueError, match="same input size D"):
    sparse_matvecs(values, indices, (w, w[:128]))


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_ternary_scales_ternarize_the_rows_read(backend):
  """A W with a scale counts as ternarize(W): RoundClip(W / s, -1, 1) · s (method.md §4), written here in NumPy; the
  pallas backend ternarizes the whole W for the kernel."""
  values, indices, w = random_problem(5, 2, 256, 130, 40, jnp.float32)
  ws = (w, w[:, :129] * 3)
  scales = [float(np.mean(np.abs(np.asarray(x, np.float64)))) + 1e-5 for x in ws]
  ys = sparse_matvecs(values, indices, ws, backend=backend, ternary_scales=(jnp.float32(scales[0]), None))
  ternary = np.clip(np.round(np.asarray(ws[0], np.float64) / scales[0]), -1, 1) * scales[0]
  assert set(np.unique(np.round(ternary / scales[0]))) <= {-1.0, 0.0, 1.0}
  np.testing.assert_allclose(np.asarray(ys[0]), np_sparse_matvec(values, indices, ternary), **TOLERANCE[jnp.float32])
  np.testing.assert_allclose(np.asarray(ys[1]), np_sparse_matvec(values, indices, ws[1]), **TOLERANCE[jnp.float32])
  with pytest.raises(ValueError, match="one entry per W"):
    sparse_matvecs(values, indices, ws, ternary_scales=(None,))


@pytest.mark.parametrize("b, plan", [(1, (16, 10)), (1, (8, 10)), (3, (2, 7)), (2, (4, 1)), (11, (1, 5))])
def test_every_step_plan_of_the_cpu_path_sums_the_same(b, plan):
  """The CPU loop's steps of `groups` x `group` entries per row (cpu_loop_plan: gathers of `groups` rows, or one
  dynamic slice), with K not a multiple of a step (zero padding) and more rows of x than one step takes (blocks of
  MAX_PARTS), against NumPy: a float W, one ternarized by its scale and packed ternary codes, in one call."""
  values, indices, w = random_problem(b, b, 300, 136, 123, jnp.float32)
  codes = np.asarray(jax.random.randint(jax.random.key(b), (300, 72), -1, 2), np.int8)
  scale = float(np.mean(np.abs(np.asarray(w[:, :40], np.float64)))) + 1e-5
  ws = (w, w[:, :40], pack_ternary(jnp.asarray(codes)))
  ys = sparse_matvecs(values, indices, ws, backend="xla", plan=plan, ternary_scales=(None, jnp.float32(scale), None))
  ternary = np.clip(np.round(np.asarray(w[:, :40], np.float64) / scale), -1, 1) * scale
  for y, w_dn in zip(ys, (w, ternary, codes)):
    np.testing.assert_allclose(np.asarray(y), np_sparse_matvec(values, indices, w_dn), **TOLERANCE[jnp.float32])
  with pytest.raises(ValueError, match=r"plan must be \(groups, group\)"):
    sparse_matvecs(values, indices, ws, backend="xla", plan=(0, 8))


@pytest.mark.parametrize("b", [1, 3, 10])
def test_narrow_weights_read_dense_above_batch_1_sum_the_same(b):
  """Above batch 1 the CPU path reads a float32 W a quarter as wide as the widest (k and v beside q) as a dense
  product of the scattered entries, and keeps ternary and packed W of the same width in its loop: against NumPy."""
  values, indices, w = random_problem(b + 20, b, 300, 256, 40, jnp.float32)
  codes = np.asarray(jax.random.randint(jax.random.key(b), (300, 64), -1, 2), np.int8)
  scale = float(np.mean(np.abs(np.asarray(w[:, :64], np.float64)))) + 1e-5
  ws = (w, w[:, :64], w[:, 64:128] * 2, pack_ternary(jnp.asarray(codes)), w[:, :65])
  scales = (None, None, jnp.float32(scale), None, None)
  assert cpu_reads.narrow_dense_reads(b, ws, scales) == (False, b > 1, False, False, False)
  ys = sparse_matvecs(values, indices, ws, backend="xla", ternary_scales=scales)
  ternary = np.clip(np.round(np.asarray(ws[2], np.float64) / scale), -1, 1) * scale
  for y, w_dn in zip(ys, (w, w[:, :64], ternary, codes, w[:, :65])):
    np.testing.assert_allclose(np.asarray(y), np_sparse_matvec(values, indices, w_dn), **TOLERANCE[jnp.float32])
  assert cpu_reads.narrow_dense_reads(8, (w, w[:, :64].astype(jnp.bfloat16)), (None, None)) == (False, False)
  # x ⊙ M handed over as sparse_bd is what a whole read multiplies: twice the entries there show which Ws read it
  sparse = np.zeros((b, 300), np.float32)
  np.put_along_axis(sparse, np.asarray(indices), 2 * np.asarray(values), axis=1)
  ys = sparse_matvecs(values, indices, ws, backend="xla", ternary_scales=scales, sparse_bd=jnp.asarray(sparse))
  for y, w_dn, whole in zip(ys, (w, w[:, :64], ternary, codes, w[:, :65]), (False, b > 1, False, False, False)):
    np.testing.assert_allclose(np.asarray(y), (1 + whole) * np_sparse_matvec(values, indices, w_dn),
                               **TOLERANCE[jnp.float32])
  with pytest.raises(ValueError, match=r"sparse_bd must be x ⊙ M \[B, D\]"):
    sparse_matvecs(values, indices, ws, backend="xla", ternary_scales=scales, sparse_bd=jnp.asarray(sparse[:, :299]))


def test_reads_measured_at_first_use_are_kept_and_sum_the_same(monkeypatch):
  """Under cpu_reads.measuring() a call above batch 1 times its candidate reads once (a real measurement over
  copies of its Ws, cut here to 2 MiB) and keeps the fastest for later calls of its shape; a fake clock that favours
  each candidate in turn picks it. Every choice sums as NumPy does; outside measuring() the rule applies."""
  monkeypatch.setattr(cpu_reads, "_CHOSEN", {})
  monkeypatch.setattr(cpu_reads, "MEASURE_BYTES", 2 * 1024 * 1024)
  monkeypatch.setattr(smv_ops, "memory_bound_threads", lambda: 2)
  values, indices, w = random_problem(7, 2, 320, 1024, 128, jnp.float32)  # 1 MiB of rows: not a small call
  ws, scales = (w, w[:, :256]), (None, None)
  options = cpu_reads.candidates(2, ws, scales)
  assert options == [(False, False), (False, True), (True, True)]
  assert cpu_reads.candidates(1, ws, scales) == [(False, False)]  # batch 1: nothing to measure
  measured = []
  real_measure = cpu_reads.measure
  monkeypatch.setattr(cpu_reads, "measure", lambda *args: measured.append(real_measure(*args)) or measured[-1])
  expected = [np_sparse_matvec(values, indices, w_dn) for w_dn in ws]
  for _ in range(2):
    with cpu_reads.measuring():
      ys = jax.jit(sparse_matvecs)(values, indices, ws)
    for y, y_np in zip(ys, expected):
      np.testing.assert_allclose(np.asarray(y), y_np, **TOLERANCE[jnp.float32])
  assert len(measured) == 1 and len(measured[0]) == 3 and min(measured[0]) > 0  # measured once, then kept
  chosen = cpu_reads._CHOSEN.copy()
  assert list(chosen.values()) == [options[int(np.argmin(measured[0]))]]
  for fastest, option in enumerate(options):
    monkeypatch.setattr(cpu_reads, "_CHOSEN", {})
    monkeypatch.setattr(cpu_reads, "measure", lambda *args, f=fastest: [1.0 + (n != f) for n in range(3)])
    with cpu_reads.measuring():
      assert cpu_reads.choose(values, ws, scales, matvecs=None, small=False) == option
      assert cpu_reads.choose(values, ws, scales, matvecs=None, small=True) == options[1]  # small: the rule
    y0, y1 = smv_ops._cpu_sparse_matvecs(values, indices, ws, scales, plan=(2, 16), dense_reads=option)
    np.testing.assert_allclose(np.asarray(y0), expected[0], **TOLERANCE[jnp.float32])
    np.testing.assert_allclose(np.asarray(y1), expected[1], **TOLERANCE[jnp.float32])
  assert cpu_reads.choose(values, ws, scales, matvecs=None, small=False) == options[1]  # not measuring: the rule


def test_cpu_loop_plan_gives_every_thread_its_share_of_a_step(monkeypatch):
  """Steps read enough bytes for XLA to split them among its threads (256 KiB each), in G groups per row of x:
  BATCH1_GROUPS at batch 1, else at most MAX_PARTS parts of G groups x B rows; a call smaller than one such step
  takes up to 8 entries per row a step."""
  monkeypatch.setattr(smv_ops, "memory_bound_threads", lambda: 2)
  for b in (1, 2, 3, 5, 8):
    for k, row_bytes in ((819, 2048 * 4), (819, 5632 * 4), (358, 896 * 4), (2253, 2048 * 4), (819, 5632)):
      groups, group = smv_ops.cpu_loop_plan(b, k, row_bytes)
      per_row = groups * group
      assert groups * b <= (smv_ops.BATCH1_GROUPS if b == 1 else smv_ops.MAX_PARTS) and per_row <= k + group
      assert min(per_row, k) * b * row_bytes >= 2 * smv_ops.XLA_CPU_BYTES_PER_THREAD or per_row >= k
      assert per_row * b <= smv_ops.MAX_ROWS_PER_STEP + b * group
  assert smv_ops.cpu_loop_plan(1, 819, 2048 * 4) == (16, 12)  # TinyLlama's 2048 x 2048: 192 rows (1.5 MiB) a step
  assert smv_ops.cpu_loop_plan(8, 819, 5632 * 4) == (1, 24)
  assert smv_ops.cpu_loop_plan(2, 26, 256 * 4) == (1, 8)  # a small model: 52 KiB in all
  with pytest.raises(ValueError, match="at most 8 rows of x"):
    smv_ops.cpu_loop_plan(9, 819, 8192)


def test_bad_input_is_named():
  values, indices, w = random_problem(0, 1, 32, 128, 4, jnp.float32)
  with pytest.raises(ValueError, match=r"values and indices must both be \[B, K\]"):
    sparse_matvec(values, indices[:, :3], w)
  with pytest.raises(ValueError, match="indices must be integers"):
    sparse_matvec(values, indices.astype(jnp.float32), w)
  with pytest.raises(ValueError, match=r"W must be \[D, N\]"):
    sparse_matvec(values, indices, w[0])
  with pytest.raises(ValueError, match="backend must be one of 'auto', 'xla', 'pallas'"):
    sparse_matvec(values, indices, w, backend="triton")
  with pytest.raises(ValueError, match=r"0 < k <= D"):
    topk_values_indices(jnp.ones((2, 8)), 9)


def test_auto_picks_the_xla_path_on_cpu_and_the_kernel_on_tpu():
  assert dispatch.resolve("auto", pallas_platforms=("tpu",)) == (
      ("pallas", False) if jax.default_backend() == "tpu" else ("xla", False))
  assert dispatch.resolve("pallas", pallas_platforms=("tpu",))[1] == (jax.default_backend() != "tpu")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_tiles_and_row_pairs(dtype):
  """Two K blocks and three column blocks; bfloat16 rows are read as 32-bit word pairs, so odd and even rows,
  neighbours kept together and the last row must each land on their own value."""
  rng = np.random.default_rng(5)
  d, n, b = 300, 384, 3
  w = jnp.asarray(rng.standard_normal((d, n)), dtype)
  rows = [np.sort(rng.choice(d, 200, replace=False)) for _ in range(b - 1)] + [np.arange(100, 300)]
  indices = jnp.asarray(np.stack(rows).astype(np.int32))  # the last row keeps adjacent pairs and row D - 1
  values = jnp.asarray(rng.standard_normal((b, 200)), dtype)
  y = sparse_matvec(values, indices, w, backend="pallas", block_sizes=BlockSizes(block_k=128, block_n=128))
  want = np_sparse_matvec(values.astype(jnp.float32), indices, w.astype(jnp.float32))
  np.testing.assert_allclose(np.asarray(y, np.float32), want, **TOLERANCE[dtype])


def test_block_sizes_are_validated():
  values, indices, w = random_problem(0, 1, 320, 256, 200, jnp.float32)
  with pytest.raises(ValueError, match=r"block_k must be a positive multiple of 128 \(the lane tile of values\)"):
    sparse_matvec(values, indices, w, backend="pallas", block_sizes=BlockSizes(block_k=64, block_n=128))
  with pytest.raises(ValueError, match=r"block_n must be a positive multiple of 128 \(the lane tile\), got 96"):
    sparse_matvec(values, indices, w, backend="pallas", block_sizes=BlockSizes(block_k=128, block_n=96))
  with pytest.raises(ValueError, match="block_k must be a positive multiple of 8"):
    BlockSizes(block_k=12, block_n=128)
  # 11008 = 43 x 256: the largest multiple of 128 up to v5p's 2048 that divides it is 256.
  assert BlockSizes.get_default(1638, 11008, chip="v5p") == BlockSizes(128, 256)
  assert BlockSizes.get_default(20, 4096) == BlockSizes(24, 1024)  # K below a block: all of it, padded to 8


# The Mosaic GPU kernel (kernel_gpu.py) in Mosaic GPU interpret mode: its body on the CPU, with GMEM, SMEM, the TMA
# copies and the barriers simulated and the race detector on. What that cannot show (the real TMA engine, speed) is
# listed in kernel_gpu.py's docstring; the compile for H100 and H200 is tests/test_gpu_kernels.py.
@pytest.mark.parametrize("b, d, n, k, dtype, block_sizes", [
    (2, 96, 256, 70, jnp.float32, GpuBlockSizes(32, 128, 2)),  # 2 column blocks x 2 splits, K padded 70 -> 128
    (3, 300, 256, 200, jnp.bfloat16, GpuBlockSizes(32, 256, 1)),  # 7 chunks: both SMEM slots reused in turn
    (1, 64, 256, 64, jnp.bfloat16, None),  # the default plan: splits up to 2 x 132 blocks, capped by the chunks
])
def test_gpu_kernel_matches_numpy_in_interpret_mode(b, d, n, k, dtype, block_sizes):
  values, indices, w = random_problem(7, b, d, n, k, dtype)
  indices = indices.at[0, 1].set(indices[0, 0])  # a row kept twice is read twice
  y = sparse_matvec_gpu(values, indices, w, block_sizes=block_sizes or GpuBlockSizes(),
                        interpret=interpret_params(detect_races=True))
  assert not races_found()
  want = np_sparse_matvec(values.astype(jnp.float32), indices, w.astype(jnp.float32))
  np.testing.assert_allclose(np.asarray(y), want, **TOLERANCE[jnp.float32])


def test_gpu_block_sizes_are_validated_and_planned():
  with pytest.raises(ValueError, match=r"block_k must be a positive multiple of 32 \(whole 128-byte span copies\)"):
    GpuBlockSizes(block_k=48)
  with pytest.raises(ValueError, match="at most 256 elements"):
    GpuBlockSizes(block_n=512)
  with pytest.raises(ValueError, match="must divide N=200"):
    GpuBlockSizes(block_n=128).plan(1, 64, 200)
  # batch 1, 4096 -> 11008 at 40%: 43 column blocks want 7 splits for 2 x 132 blocks; 1638 kept = 52 chunks of 32
  assert GpuBlockSizes().plan(1, 1638, 11008) == (7, 8)
  assert GpuBlockSizes().plan(16, 1638, 11008) == (1, 52)  # 688 blocks already
  assert gpu_block_sizes(11008) == GpuBlockSizes(block_n=256) and gpu_block_sizes(384) == GpuBlockSizes(block_n=128)
  assert gpu_block_sizes(200) is None


def test_auto_keeps_xla_on_gpus_until_the_record_lists_the_kernel():
  assert gpu_verified.RECORD == ()  # no GPU has run scripts/bench_gpu.sh yet
  assert gpu_verified.target_gpu() is None  # compiled for the CPU here
  assert gpu_verified.gpu_name("NVIDIA H100 80GB HBM3") == "H100" and gpu_verified.gpu_name("NVIDIA H200") == "H200"
  record = (gpu_verified.Verified("sparse_matvec", "H200", "2026-01-01", 1e-6, 1.6),
            gpu_verified.Verified("ternary_matmul", "H100", "2026-01-01", 0.0, 0.9))
  assert gpu_verified.verified("sparse_matvec", "H200", record)
  assert not gpu_verified.verified("sparse_matvec", "H100", record)
  assert not gpu_verified.verified("ternary_matmul", "H100", record)  # slower than XLA there
  assert not gpu_verified.verified("sparse_matvec", None, record)
