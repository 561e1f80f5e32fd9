"""The scaling study: the law L(N, S) and its fit, sweeps of training runs, reports and plots.

May import everything below it; nothing in the package imports research (only the CLI).
"""
