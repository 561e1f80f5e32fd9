"""Continued training at small scale: configs/pretrain_tiny_dense.py's model with top-K at every site
(sparsity 0.3), from that run's weights, with the shape of the paper's recipe (method.md §7: a lower learning rate
decayed polynomially after a warm-up, clip 2.0, weight decay 0.01).

    qsparse train --config configs/pretrain_tiny_dense.py
    qsparse train --config configs/continue_tiny.py
"""

from qsparse_jax.config import Config, DataConfig, ModelConfig, TrainConfig

config = Config(
    model=ModelConfig(vocab_size=257, d_model=192, num_layers=4, num_heads=6, d_ff=512, max_seq_len=128,
                      activation="silu").with_sparsity(0.3),
    data=DataConfig(source="python_stdlib", seq_len=128, validation_fraction=0.05),
    train=TrainConfig(steps=150, batch_size=32, learning_rate=1e-3, end_learning_rate=3e-5, warmup_steps=15,
                      decay="polynomial", weight_decay=0.01, clip_norm=2.0, eval_every=25, eval_batches=8,
                      log_every=10, checkpoint_every=50, out_dir="runs/continue_tiny", init_from="runs/tiny_dense",
                      sample_prompt="def "),
)
