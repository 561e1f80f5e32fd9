"""Meshes, logical-axis rules and shardings (jit + NamedSharding), and multi-process start-up.

May import qsparse_jax.ops and pallas_kernels; nothing above.
"""
