"""The paper's 7b Q-Sparse model trained from scratch (method.md §7): hidden 4096, GLU 11008, 32 heads, 32 layers."""

from qsparse_jax.config import paper_pretraining

config = paper_pretraining("7b", d_model=4096, d_ff=11008, num_heads=32, num_layers=32, learning_rate=1.5e-4)
