"""Text and instruction data: tokenizers, TFDS builders, Grain pipelines, chat templates, packing, DataConfig.

May import qsparse_jax.ops, pallas_kernels, parallel, nn and hf; nothing above. (Today it needs none of them.)
"""
