"""Pallas kernels for the Q-Sparse core (selection, sparse matvec, n:m matmul, ternary matmul).

One folder per kernel: kernel.py (the pallas_call), ops.py (the public jitted entry, shape checks and backend
dispatch) and reference.py (the pure-jnp reference the tests compare against).

Every op takes `backend`: "pallas" (the kernel; in interpret mode on the CPU, for tests), "xla" (plain JAX: on the
CPU a fast path of its own, elsewhere what XLA compiles), or "auto" (the default: the kernel where one is compiled
for the platform, the XLA path otherwise). See `dispatch.resolve`.
"""
