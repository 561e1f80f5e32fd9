"""Inference: loading a trained run, the KV-cache sparse decode loop with sampling, evaluation (loss, sparsity).

May import training and everything below it. `qsparse_jax.inference.load(run_dir)` loads a run.
"""

from qsparse_jax.inference.loading import LoadedModel, load, with_model
