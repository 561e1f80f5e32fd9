"""Pallas kernels for the Q-Sparse core (selection, sparse matvec, n:m matmul, ternary matmul).

One folder per kernel: kernel.py (the pallas_call), ops.py (the public jitted entry, shape checks and backend
dispatch) and reference.py (the pure-jnp reference the tests compare against).

Every op takes `backend`: "pallas" (the kernel: Mosaic on a TPU, interpret mode elsewhere, for tests), "xla" (plain
JAX: on the CPU a fast path of its own, elsewhere what XLA compiles), or "auto" (the default: the kernel where the
program is compiled for a TPU and the op's `kernel_supported` accepts the dtypes and shapes, the XLA path otherwise).
The choice follows the platform compiled for, not the process's default backend (`dispatch.select`), and every
kernel takes its tiles as a frozen `BlockSizes` (defaults per TPU generation, validated against the dtype tiling).
"""
