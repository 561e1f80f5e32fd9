"""The paper's 300m Q-Sparse model trained from scratch (method.md §7): hidden 1024, GLU 2730, 16 heads, 24 layers."""

from qsparse_jax.config import paper_pretraining

config = paper_pretraining("300m", d_model=1024, d_ff=2730, num_heads=16, num_layers=24, learning_rate=6e-4)
