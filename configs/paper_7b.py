"""The paper's 7b Q-Sparse model trained from scratch (method.md §7): hidden 4096, GLU 11008, 32 heads, 32 layers.

Slice: v5p-128 (64 chips, FSDP over all of them), blocks scanned, remat full, 2 micro-batches of 128 rows: 6.1 GiB
per chip (0.064 of HBM) at the paper's 256 x 2048 tokens per step, measured with
`qsparse compile --config configs/paper_7b.py --topology v5p-128` (docs/scaling-to-pods.md).
"""

from qsparse_jax.config import paper_pretraining

config = paper_pretraining("7b", d_model=4096, d_ff=11008, num_heads=32, num_layers=32, learning_rate=1.5e-4,
                           remat="full", microbatches=2)
