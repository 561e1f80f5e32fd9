"""Supervised fine-tuning of Qwen1.5 7B into a Q-Sparse model, the paper's recipe (method.md §7).

OpenOrca, one epoch, batch 128, learning rate 3e-6 ... 7e-6 (5e-6 here) with cosine decay after a 3% warm-up; top-K
at every site from the dense Hugging Face checkpoint, at the sparsities of the paper's Table 2 (40% q/k/v, out,
up/gate; 60% down, after the SiLU GLU). Qwen's ChatML template; loss on response tokens only.

OpenOrca's records ({"system_prompt", "question", "response"}) are read from JSONL files (convert the dataset's
parquet files once, e.g. with pandas' to_json(orient="records", lines=True)). Rows of 2048 tokens hold several
conversations (packing without attention across them), so one epoch is fewer steps than records / 128: the
preset's steps assume about 4.2M records and 4 conversations per row; adjust train.steps to your copy.

Slice: v5p-64 (32 chips, FSDP over all of them), blocks scanned, remat full, 4 micro-batches of 32 rows: 14.5 GiB
per chip (0.153 of HBM), measured with `qsparse compile --config configs/sft_qwen_7b.py --topology v5p-64`.

    qsparse train --config configs/sft_qwen_7b.py train.init_from=hf:/models/Qwen1.5-7B \
        data.tokenizer=hf:/models/Qwen1.5-7B/tokenizer.json data.paths=/data/openorca
"""

import dataclasses

from qsparse_jax.config import Config, DataConfig, MeshConfig, ModelConfig, TrainConfig

QWEN1_5_7B = ModelConfig(vocab_size=151936, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=32, d_ff=11008,
                         activation="silu", max_seq_len=32768, rope_theta=1_000_000.0, tie_embeddings=False,
                         qkv_bias=True, norm_eps=1e-6, dtype="bfloat16")  # Qwen1.5-7B's config.json (Qwen2 family)

RECORDS, CONVERSATIONS_PER_ROW, BATCH = 4_200_000, 4, 128
STEPS = RECORDS // (CONVERSATIONS_PER_ROW * BATCH)  # one epoch

config = Config(
    model=dataclasses.replace(QWEN1_5_7B, sparsity_qkv=0.4, sparsity_out=0.4, sparsity_up=0.4, sparsity_down=0.6,
                              remat="full", scan_layers=True),
    data=DataConfig(source="files", paths=("/data/openorca",), format="instructions", chat_template="chatml",
                    seq_len=2048, validation_fraction=0.002, tokenizer="hf:/models/Qwen1.5-7B/tokenizer.json"),
    train=TrainConfig(steps=STEPS, batch_size=BATCH, microbatches=4, learning_rate=5e-6, end_learning_rate=5e-7,
                      warmup_steps=round(0.03 * STEPS), decay="cosine", weight_decay=0.0, clip_norm=1.0,
                      eval_every=500, eval_batches=16, checkpoint_every=500, out_dir="runs/sft_qwen_7b",
                      init_from="hf:/models/Qwen1.5-7B",
                      sample_prompt="Explain in two sentences why the sky is blue."),
    mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
)
