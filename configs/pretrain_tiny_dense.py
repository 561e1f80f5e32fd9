"""A tiny dense model with SiLU GLUs (like the pretrained models continued training starts from), trained on the
standard library's sources; configs/continue_tiny.py then turns it into a Q-Sparse model.

    qsparse train --config configs/pretrain_tiny_dense.py
"""

from qsparse_jax.config import Config, DataConfig, ModelConfig, TrainConfig

config = Config(
    model=ModelConfig(vocab_size=257, d_model=192, num_layers=4, num_heads=6, d_ff=512, max_seq_len=128,
                      activation="silu"),
    data=DataConfig(source="python_stdlib", seq_len=128, validation_fraction=0.05),
    train=TrainConfig(steps=300, batch_size=32, learning_rate=3e-3, end_learning_rate=3e-4, warmup_steps=30,
                      weight_decay=0.1, clip_norm=1.0, eval_every=100, eval_batches=8, log_every=10,
                      checkpoint_every=100, out_dir="runs/tiny_dense", sample_prompt="def "),
)
