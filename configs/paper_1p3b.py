"""The paper's 1p3b Q-Sparse model trained from scratch (method.md §7): hidden 2048, GLU 5460, 32 heads, 24 layers."""

from qsparse_jax.config import paper_pretraining

config = paper_pretraining("1p3b", d_model=2048, d_ff=5460, num_heads=32, num_layers=24, learning_rate=2e-4)
