"""The paper's 300m Q-Sparse model trained from scratch (method.md §7): hidden 1024, GLU 2730, 16 heads, 24 layers.

Slice: v5p-8 (4 chips, FSDP over all of them), blocks scanned, remat full, 4 micro-batches of 64 rows: 9.3 GiB per
chip (0.098 of HBM) at the paper's 256 x 2048 tokens per step, measured with
`qsparse compile --config configs/paper_300m.py --topology v5p-8` (docs/scaling-to-pods.md).
"""

from qsparse_jax.config import paper_pretraining

config = paper_pretraining("300m", d_model=1024, d_ff=2730, num_heads=16, num_layers=24, learning_rate=6e-4,
                           remat="full", microbatches=4)
