"""configs/scaling_sweep.py's full-precision family trained twice (seeds 0 and 1: another initialization and data
order, the same validation data), to measure run-to-run noise and fit the law on two points per (size, sparsity).
Its seed-0 runs are the main sweep's, so after that sweep this trains 15 runs (39 minutes on 2 CPU cores).

    qsparse scaling sweep --sweep configs/scaling_sweep_seeds.py
    qsparse scaling fit --sweep configs/scaling_sweep_seeds.py
"""

import dataclasses
import pathlib

from qsparse_jax.research.sweep import load_sweep

sweep = dataclasses.replace(load_sweep(pathlib.Path(__file__).with_name("scaling_sweep.py")), precisions=("full",),
                            seeds=(0, 1))
