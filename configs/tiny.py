"""Tiny Q-Sparse model: trains on 2 CPU cores in minutes, on Python's standard library sources (byte-level).

Q-Sparse at every site with the paper's main setting "top-K 70%" (sparsity 0.3), ReLU²GLU, STE.
    qsparse train --config configs/tiny.py
"""

from qsparse_jax.config import Config, DataConfig, ModelConfig, TrainConfig

config = Config(
    model=ModelConfig(vocab_size=257, d_model=192, num_layers=4, num_heads=6, d_ff=512, max_seq_len=128,
                      activation="relu2").with_sparsity(0.3),
    data=DataConfig(source="python_stdlib", seq_len=128, validation_fraction=0.05),
    train=TrainConfig(steps=300, batch_size=32, learning_rate=3e-3, end_learning_rate=3e-4, warmup_steps=30,
                      weight_decay=0.1, clip_norm=1.0, eval_every=100, eval_batches=8, log_every=10,
                      checkpoint_every=100, out_dir="runs/tiny", sample_prompt="def "),
)
