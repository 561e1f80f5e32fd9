"""The record of Mosaic GPU kernels whose numbers and speed were checked on a real GPU, which lets "auto" use them.

A kernel compiles for H100/H200 without a GPU (tests/test_gpu_kernels.py) and its body runs in Mosaic GPU interpret
mode on the CPU, but the TMA engine, the warpgroup's ordering and the speed are seen only on a device. So "auto" on a
GPU keeps the XLA path for every kernel until `scripts/bench_gpu.sh` has run on that GPU: it checks the kernel
against its reference first, then times it against the dense XLA matvec; an entry below is added from its output
(kernel, GPU, date, max error, speedup). backend="pallas" uses the GPU kernels regardless (pallas_kernels/dispatch.py).

Empty: no GPU has run them yet (issue 19 was written with no device lent).
"""

from __future__ import annotations

import dataclasses

import jax

GPUS = ("H100", "H200")  # the GPU names of the record, as found in a device's device_kind ("NVIDIA H100 80GB HBM3")


@dataclasses.dataclass(frozen=True)
class Verified:
  """One kernel checked on one GPU: max |kernel - reference| at the bench's shapes, and its speedup over the dense
  XLA path there (a kernel is listed only if it was correct; "auto" uses it only if speedup > 1)."""

  kernel: str  # the op's folder under pallas_kernels/: "sparse_matvec", "ternary_matmul"
  gpu: str  # one of GPUS
  date: str  # ISO date of the bench run
  max_error: float
  speedup: float
  notes: str = ""  # shapes, dtype, batch of the figures; the bench's command


RECORD: tuple[Verified, ...] = ()


def gpu_name(device_kind: str | None) -> str | None:
  """"H100" or "H200" for a device_kind naming one, else None."""
  return next((gpu for gpu in GPUS if device_kind and gpu in device_kind), None)


def target_gpu() -> str | None:
  """The GPU a program is being compiled for while tracing: the device of the mesh set by `jax.set_mesh` (deviceless
  topologies included), else the default device when it is a GPU; None when neither is an H100 or H200."""
  abstract = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  if abstract is not None:
    return gpu_name(abstract.device_kind) if abstract.platform in ("gpu", "cuda") else None
  try:
    device = jax.devices()[0]
  except RuntimeError:
    return None
  return gpu_name(device.device_kind) if device.platform == "gpu" else None


def verified(kernel: str, gpu: str | None, record: tuple[Verified, ...] | None = None) -> bool:
  """Whether `record` (default RECORD) shows kernel correct and faster than XLA on gpu (the condition for "auto" to
  use it)."""
  record = RECORD if record is None else record
  return gpu is not None and any(v.kernel == kernel and v.gpu == gpu and v.speedup > 1 for v in record)
