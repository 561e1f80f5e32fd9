"""The paper's 700m Q-Sparse model trained from scratch (method.md §7): hidden 1536, GLU 4096, 24 heads, 24 layers.

Slice: v5p-8 (4 chips, FSDP over all of them), blocks scanned, remat full, 8 micro-batches of 32 rows: 9.0 GiB per
chip (0.095 of HBM) at the paper's 256 x 2048 tokens per step, measured with
`qsparse compile --config configs/paper_700m.py --topology v5p-8` (docs/scaling-to-pods.md).
"""

from qsparse_jax.config import paper_pretraining

config = paper_pretraining("700m", d_model=1536, d_ff=4096, num_heads=24, num_layers=24, learning_rate=2.5e-4,
                           remat="full", microbatches=8)
