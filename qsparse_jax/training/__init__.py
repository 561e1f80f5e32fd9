"""Training: the jitted step, the loop, the optimizer, Orbax checkpoints, starting from pretrained weights.

May import everything below it (ops, pallas_kernels, parallel, nn, hf, data) and qsparse_jax.config.
"""
