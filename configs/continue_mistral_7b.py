"""Continued training of Mistral 7B into a Q-Sparse model, the paper's recipe (method.md §7).

40B tokens: 10K steps of 4M tokens (1024 x 4096), lr 5e-5 -> 1e-6 polynomial after 375 warm-up steps, clip 2.0,
weight decay 0.01, from the dense Hugging Face checkpoint. Top-K at every site, after the activation for the SiLU
down projection (method.md §1), at the sparsities of the paper's Table 2 (40% q/k/v, out, up/gate; 60% down).

Slice: v5p-128 (64 chips, FSDP over all of them), blocks scanned, remat full, 8 micro-batches of 128 rows: 9.5 GiB
per chip (0.100 of HBM), measured with `qsparse compile --config configs/continue_mistral_7b.py --topology v5p-128`.

    qsparse train --config configs/continue_mistral_7b.py train.init_from=hf:/models/Mistral-7B-v0.1 \
        data.tokenizer=hf:/models/Mistral-7B-v0.1/tokenizer.json data.tfds_name=c4/en
"""

import dataclasses

from qsparse_jax.config import Config, DataConfig, MeshConfig, ModelConfig, TrainConfig

MISTRAL_7B = ModelConfig(vocab_size=32000, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8, d_ff=14336,
                         activation="silu", max_seq_len=4096, rope_theta=10000.0, tie_embeddings=False,
                         norm_eps=1e-5, dtype="bfloat16")  # Mistral-7B-v0.1's config.json (window 4096)

config = Config(
    model=dataclasses.replace(MISTRAL_7B, sparsity_qkv=0.4, sparsity_out=0.4, sparsity_up=0.4, sparsity_down=0.6,
                              remat="full", scan_layers=True),
    data=DataConfig(source="tfds", tfds_name="c4/en", seq_len=4096,
                    tokenizer="hf:/models/Mistral-7B-v0.1/tokenizer.json"),
    train=TrainConfig(steps=10_000, batch_size=1024, microbatches=8, learning_rate=5e-5, end_learning_rate=1e-6,
                      warmup_steps=375, decay="polynomial", weight_decay=0.01, clip_norm=2.0, eval_every=500,
                      checkpoint_every=500, out_dir="runs/continue_mistral_7b", init_from="hf:/models/Mistral-7B-v0.1"),
    mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
)
