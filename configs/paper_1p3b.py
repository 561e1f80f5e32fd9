"""The paper's 1p3b Q-Sparse model trained from scratch (method.md §7): hidden 2048, GLU 5460, 32 heads, 24 layers.

Slice: v5p-8 (4 chips, FSDP over all of them), blocks scanned, remat full, 8 micro-batches of 32 rows: 14.9 GiB per
chip (0.157 of HBM) at the paper's 256 x 2048 tokens per step, measured with
`qsparse compile --config configs/paper_1p3b.py --topology v5p-8` (docs/scaling-to-pods.md).
"""

from qsparse_jax.config import paper_pretraining

config = paper_pretraining("1p3b", d_model=2048, d_ff=5460, num_heads=32, num_layers=24, learning_rate=2e-4,
                           remat="full", microbatches=8)
