"""hlo_traffic: the bytes one execution of a compiled program moves, counted by hand.

A module written out in HLO text exercises each rule (a fused row read, an in-place update, a conditional, a loop
without a known trip count, a library call's scratch buffer); then small programs compiled for this CPU, whose every
instruction is counted here from the shapes: a matvec, a scan of 4 steps each reading one row of W (XLA's own
cost_analysis counts its body once), and a fusion that gathers rows. The decode step of a whole model is checked in
tests/test_compile.py.
"""

import jax
import jax.numpy as jnp
import pytest
from jax import lax

from qsparse_jax.training.hlo_traffic import parse_module, shape_bytes, traffic, tuple_elements

MODULE = """HloModule written_by_hand, entry_computation_layout={(f32[64,256]{1,0}, f32[256]{0}, s32[], pred[])->f32[256]}

%row (p0: f32[64,256], p1: s32[]) -> f32[256] {
  %p0 = f32[64,256]{1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %zero = s32[] constant(0)
  %ds = f32[1,256]{1,0} dynamic-slice(%p0, %p1, %zero), dynamic_slice_sizes={1,256}
  ROOT %flat = f32[256]{0} bitcast(%ds)
}

%update (p0.1: f32[64,256], p1.1: f32[256], p2.1: s32[]) -> f32[64,256] {
  %p0.1 = f32[64,256]{1,0} parameter(0)
  %p1.1 = f32[256]{0} parameter(1)
  %p2.1 = s32[] parameter(2)
  %as_row = f32[1,256]{1,0} bitcast(%p1.1)
  %zero.1 = s32[] constant(0)
  ROOT %dus = f32[64,256]{1,0} dynamic-update-slice(%p0.1, %as_row, %p2.1, %zero.1)
}

%small (a: f32[256]) -> f32[256] {
  %a = f32[256]{0} parameter(0)
  ROOT %neg = f32[256]{0} negate(%a)
}

%big (b: f32[256]) -> f32[256] {
  %b = f32[256]{0} parameter(0)
  %twice = f32[256]{0} add(%b, %b)
  ROOT %thrice = f32[256]{0} add(%twice, %b)
}

%body (state: (f32[256], s32[])) -> (f32[256], s32[]) {
  %state = (f32[256]{0}, s32[]) parameter(0)
  %x.2 = f32[256]{0} get-tuple-element(%state), index=0
  %i.2 = s32[] get-tuple-element(%state), index=1
  %y.2 = f32[256]{0} multiply(%x.2, %x.2)
  ROOT %next = (f32[256]{0}, s32[]) tuple(%y.2, %i.2)
}

%cond (state.1: (f32[256], s32[])) -> pred[] {
  %state.1 = (f32[256]{0}, s32[]) parameter(0)
  %i.3 = s32[] get-tuple-element(%state.1), index=1
  %limit = s32[] constant(3)
  ROOT %lt = pred[] compare(%i.3, %limit), direction=LT
}

ENTRY %main (w: f32[64,256], x: f32[256], i: s32[], p: pred[]) -> f32[256] {
  %w = f32[64,256]{1,0} parameter(0), metadata={op_name="w(0)"}
  %x = f32[256]{0} parameter(1)
  %i = s32[] parameter(2)
  %p = pred[] parameter(3)
  %r = f32[256]{0} fusion(%w, %i), kind=kLoop, calls=%row
  %u = f32[64,256]{1,0} fusion(%w, %r, %i), kind=kLoop, calls=%update
  %c = f32[256]{0} conditional(%p, %r, %r), branch_computations={%small, %big}
  %t = (f32[256]{0}, s32[]) tuple(%c, %i)
  %loop = (f32[256]{0}, /*index=1*/s32[]) while(%t), condition=%cond, body=%body, metadata={op_name="a(b)=c"}
  %y = f32[256]{0} get-tuple-element(%loop), index=0
  %gemm = (f32[256]{0}, u8[1048576]{0}) custom-call(%u, %y), custom_call_target="__cublas$gemm"
  ROOT %out = f32[256]{0} get-tuple-element(%gemm), index=0
}
"""
ROW = 256 * 4  # one row of W, one vector of 256 floats


def test_shapes_and_tuples_are_sized_from_their_text():
  assert shape_bytes("bf16[2,3]{1,0}") == 12
  assert shape_bytes("(s32[], f32[8]{0}, /*index=2*/pred[4])") == 4 + 32 + 4
  assert shape_bytes("f32[8,128]{1,0:T(8,128)S(1)}") == 4096
  assert shape_bytes("token[]") == 0 and shape_bytes("s4[16]") == 8
  assert tuple_elements("(f32[2]{0}, (s32[], u8[4]), /*index=2*/bf16[3])") == ["f32[2]{0}", "(s32[], u8[4])",
                                                                                "bf16[3]"]


def test_written_module_parses():
  computations, entry = parse_module(MODULE)
  assert entry == "main" and set(computations) == {"row", "update", "small", "big", "body", "cond", "main"}
  main = computations["main"]
  assert main.root == "out"
  assert main.instructions["c"].called == {"branch_computations": ("small", "big")}
  assert main.instructions["loop"].called == {"condition": ("cond",), "body": ("body",)}
  assert main.instructions["loop"].trip_count is None
  assert main.instructions["u"].operands == ("w", "r", "i")


def test_each_rule_counts_the_bytes_written_out_here():
  row_read = ROW + ROW + 4  # the fused dynamic-slice reads one row of W (not 64), writes it; reads i
  in_place = ROW + ROW + 4  # the fused update writes one row, reads r and i, and nothing of the W it updates
  branch = 2 * (3 * ROW)  # the larger branch: two adds of two vectors into one
  trip = 3 * ROW  # the loop body's multiply; its condition compares two scalars into a pred
  condition = 4 + 4 + 1
  gemm = 64 * ROW + ROW + ROW  # both operands and the result, not the 1 MiB workspace
  outside = row_read + in_place + branch + gemm
  assert traffic(MODULE) == (outside + trip + 2 * condition, 1)  # no trip count: once, and said so
  assert traffic(MODULE, lambda loop: 3).bytes == outside + 3 * trip + 4 * condition


def test_matvec_reads_w_once():
  x, w = jnp.ones((256,), jnp.float32), jnp.ones((256, 512), jnp.float32)
  text = jax.jit(jnp.dot).lower(x, w).compile().as_text()
  assert traffic(text) == (256 * 4 + 256 * 512 * 4 + 512 * 4, 0)  # x, W, y: one dot between bitcasts


def test_scan_counts_its_body_once_per_step_reading_one_row():
  """4 steps, each adding row idx[s] of W [64, 1024] to a running sum: XLA counts the loop's body once (and all of
  W in it); one execution reads 4 rows."""
  def rows_sum(w, idx):
    return lax.scan(lambda acc, i: (acc + lax.dynamic_index_in_dim(w, i, keepdims=False), None),
                    jnp.zeros(w.shape[1]), idx)[0]

  compiled = jax.jit(rows_sum).lower(jnp.ones((64, 1024)), jnp.arange(4)).compile()
  row = 1024 * 4
  per_step = 3 * row + 4 + 4  # read the row and the sum, write the sum; read idx[s] (a slice) and the step counter
  per_step += 8 + 12  # the counter's copy (read, write) and increment (two reads, one write)
  before = 8 + 4 + row  # the counter's initial copy; zeros (a scalar read, a vector written)
  condition = 4 + 4 + 1  # counter < 4, checked 5 times
  assert traffic(compiled.as_text()) == (before + 4 * per_step + 5 * condition, 0)
  assert compiled.cost_analysis()["bytes accessed"] < before + 2 * per_step  # XLA's own count: about one step


def test_fused_gather_reads_only_the_gathered_rows():
  w, idx = jnp.ones((64, 1024), jnp.float32), jnp.array([3, 9, 40])
  text = jax.jit(lambda w, idx: 2 * jnp.take(w, idx, axis=0).sum(0)).lower(w, idx).compile().as_text()
  assert text.count(" fusion(") == 1  # one fusion: gather, sum, scale
  assert traffic(text) == (3 * 1024 * 4 + 3 * 4 + 1024 * 4, 0)  # 3 rows of W and 3 indices read, the sum written
