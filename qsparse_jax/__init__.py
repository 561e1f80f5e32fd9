"""qsparse-jax: Q-Sparse activation sparsity (top-K, straight-through, Block Q-Sparse, 1.58-bit) for JAX and Flax NNX.

The operators of qsparse_jax.ops are re-exported here (qsparse_jax.topk_sparsify, ...); the rest lives in
subpackages by role (docs/architecture.md) and is imported from them.
"""

from qsparse_jax.ops import *  # noqa: F403 (the public operators, as listed in qsparse_jax.ops.__all__)
from qsparse_jax.ops import __all__

__version__ = "0.1.0"
