"""The paper's 300m Q-Sparse model (method.md §7): hidden 1024, GLU 2730, 16 heads, 24 layers, lr 6e-4.

RedPajama-style pretraining: sequence 2048, 0.5M tokens per batch (256 x 2048), Adam(0.9, 0.95), weight decay 0.1,
ReLU²GLU, top-K 70% (sparsity 0.3) at every site. Point data.source at a TFDS text dataset or local files, and set
data.tokenizer to a 32k SentencePiece model (the vocabulary size below).
"""

from qsparse_jax.config import Config, DataConfig, TrainConfig
from qsparse_jax.model import ModelConfig

config = Config(
    model=ModelConfig(vocab_size=32000, d_model=1024, num_layers=24, num_heads=16, d_ff=2730, max_seq_len=2048,
                      activation="relu2", tie_embeddings=False, dtype="bfloat16").with_sparsity(0.3),
    data=DataConfig(source="tfds", tfds_name="c4/en", seq_len=2048),
    train=TrainConfig(steps=100_000, batch_size=256, learning_rate=6e-4, end_learning_rate=6e-4 / 10,
                      warmup_steps=375, decay="cosine", weight_decay=0.1, clip_norm=1.0, eval_every=1000,
                      checkpoint_every=1000, out_dir="runs/paper_300m"),
)
