"""The scaling sweep of method.md §6 at small scale: 3 model sizes spanning 18x in non-embedding parameters
(0.10M, 0.59M, 1.77M) x sparsities 0, 0.3, 0.45, 0.6, 0.8 at every site x full-precision and BitNet b1.58 weights:
30 runs, each 400 steps of 16 x 128 bytes (0.82M tokens) of the standard library's sources, ReLU²GLU, top-K with STE.

    qsparse scaling sweep --sweep configs/scaling_sweep.py     # about 1.5 hours on 2 CPU cores; resumable
    qsparse scaling fit --sweep configs/scaling_sweep.py --plots docs/
"""

from qsparse_jax.config import Config, DataConfig, ModelConfig, TrainConfig
from qsparse_jax.research.sweep import Sweep

sweep = Sweep(
    base=Config(
        model=ModelConfig(vocab_size=257, max_seq_len=128, activation="relu2"),
        data=DataConfig(source="python_stdlib", seq_len=128, validation_fraction=0.05),
        train=TrainConfig(steps=400, batch_size=16, learning_rate=3e-3, end_learning_rate=3e-4, warmup_steps=40,
                          weight_decay=0.1, clip_norm=1.0, eval_every=400, eval_batches=16, log_every=50,
                          checkpoint_every=200, keep_checkpoints=1, sample_tokens=0, progress=False),
    ),
    sizes={
        "d64": dict(d_model=64, num_layers=2, num_heads=2, d_ff=176),
        "d128": dict(d_model=128, num_layers=3, num_heads=4, d_ff=344),
        "d192": dict(d_model=192, num_layers=4, num_heads=6, d_ff=512),
    },
    sparsities=(0.0, 0.3, 0.45, 0.6, 0.8),
    precisions=("full", "ternary"),
    out_dir="runs/scaling",
)
