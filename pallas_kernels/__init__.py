"""Pallas kernels for the Q-Sparse core (selection, sparse matvec, n:m matmul, ternary matmul).

One folder per kernel: kernel.py (the pallas_call), ops.py (the public jitted entry and backend dispatch) and
reference.py (the pure-jnp reference the tests compare against). Filled in by the kernel issue.
"""
