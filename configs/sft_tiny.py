"""Supervised fine-tuning at small scale: configs/pretrain_tiny_dense.py's model, fine-tuned on instructions built from
the standard library's documented functions ("Write the Python function `name`: <docstring summary>" answered by its
source), with top-K at every site (sparsity 0.3) switched on for the fine-tuning, as the paper fine-tunes dense
models into Q-Sparse ones (method.md §7). Loss on response tokens only; conversations packed into rows of 384 tokens
without attention across them; the shape of the paper's recipe: cosine decay after a 3% warm-up.

    qsparse train --config configs/pretrain_tiny_dense.py
    qsparse train --config configs/sft_tiny.py
"""

from qsparse_jax.config import Config, DataConfig, ModelConfig, TrainConfig

config = Config(
    model=ModelConfig(vocab_size=257, d_model=192, num_layers=4, num_heads=6, d_ff=512, max_seq_len=384,
                      activation="silu").with_sparsity(0.3),
    data=DataConfig(source="python_stdlib", format="instructions", chat_template="chatml", seq_len=383,
                    validation_fraction=0.05),
    train=TrainConfig(steps=200, batch_size=16, learning_rate=1e-3, end_learning_rate=1e-4, warmup_steps=6,
                      decay="cosine", weight_decay=0.01, clip_norm=1.0, eval_every=20, eval_batches=6, log_every=10,
                      checkpoint_every=100, out_dir="runs/sft_tiny", init_from="runs/tiny_dense",
                      sample_prompt="Write the Python function `is_even`: Return True if n is even.",
                      sample_tokens=120),
)
