"""The Q-Sparse scaling law and its inference-optimal sparsity (method.md §6).

    L(N, S) = E + A(S) / N^α,    A(S) = B + C · exp(β / (1 − S))

N is the model's non-embedding parameter count, S the sparsity. The fit follows the paper (and Chinchilla's
approach 3): with e = ln E, b = ln B, c = ln C, the predicted log loss is

    ln L̂ = LSE(e, b − α ln N, c + β / (1 − S) − α ln N)

and θ = (e, b, c, β, α) minimizes Σ Huber_δ(ln L̂ − ln L) with δ = 1e-3, by L-BFGS from every point of a grid of
starting values, keeping the best. With activated parameters N_a = N (1 − S) the law becomes
L = E + A(S) ((1 − S) / N_a)^α, so the sparsity that minimizes loss for a budget of activated parameters minimizes
A(S) (1 − S)^α, whatever N_a is: `optimal_sparsity`.

Pure NumPy and SciPy (float64): the data are a few dozen points.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Sequence

import numpy as np
import scipy.optimize

HUBER_DELTA = 1e-3


@dataclasses.dataclass(frozen=True)
class ScalingLaw:
  """L(N, S) = E + (B + C exp(β / (1 − S))) / N^α."""

  E: float
  B: float
  C: float
  beta: float
  alpha: float

  def loss(self, n, s):
    """Predicted loss at non-embedding parameters n and sparsity s (NumPy broadcasting)."""
    n, s = np.asarray(n, np.float64), np.asarray(s, np.float64)
    return self.E + (self.B + self.C * np.exp(self.beta / (1 - s))) / n ** self.alpha

  def loss_at_activated(self, n_activated, s):
    """Predicted loss of the model with n_activated activated parameters at sparsity s (N = N_a / (1 − S))."""
    s = np.asarray(s, np.float64)
    return self.loss(np.asarray(n_activated, np.float64) / (1 - s), s)

  def as_dict(self) -> dict[str, float]:
    return dataclasses.asdict(self)


# The paper's constants (rounded, method.md §6).
PAPER_FULL_PRECISION = ScalingLaw(E=1.86, B=0.01, C=1.89, beta=0.05, alpha=0.10)
PAPER_OPTIMAL_SPARSITY = {"full precision": 0.4558, "1.58-bit": 0.6125}


def _objective(theta: np.ndarray, log_n: np.ndarray, inv_dense: np.ndarray, log_loss: np.ndarray,
               delta: float) -> tuple[float, np.ndarray]:
  """Σ Huber_δ(ln L̂ − ln L) and its gradient in θ = (e, b, c, β, α)."""
  e, b, c, beta, alpha = theta
  terms = np.stack([np.full_like(log_n, e), b - alpha * log_n, c + beta * inv_dense - alpha * log_n])  # [3, P]
  top = terms.max(axis=0)
  weights = np.exp(terms - top)
  total = weights.sum(axis=0)
  residual = top + np.log(total) - log_loss  # ln L̂ − ln L
  weights /= total  # ∂ ln L̂ / ∂ terms (softmax)
  small = np.abs(residual) <= delta
  value = np.where(small, 0.5 * residual**2, delta * (np.abs(residual) - 0.5 * delta)).sum()
  slope = np.clip(residual, -delta, delta)  # Huber'
  grad = np.array([
      (slope * weights[0]).sum(),
      (slope * weights[1]).sum(),
      (slope * weights[2]).sum(),
      (slope * weights[2] * inv_dense).sum(),
      (slope * -log_n * (weights[1] + weights[2])).sum(),
  ])
  return float(value), grad


DEFAULT_GRID = {  # 3^5 = 243 starts, about a minute on one CPU core
    "e": (-0.5, 0.5, 1.0),
    "b": (-5.0, 0.0, 5.0),
    "c": (-5.0, 0.0, 5.0),
    "beta": (-0.5, 0.1, 1.0),
    "alpha": (0.1, 0.3, 0.6),
}


@dataclasses.dataclass(frozen=True)
class Fit:
  law: ScalingLaw
  objective: float  # the Huber objective at the optimum
  starts: int  # L-BFGS runs made (one per grid point)


def fit(n: Sequence[float], s: Sequence[float], loss: Sequence[float], *, grid: dict | None = None,
        delta: float = HUBER_DELTA) -> Fit:
  """The ScalingLaw that best fits (n, s, loss) points, by L-BFGS from every point of grid (DEFAULT_GRID: values
  of e = ln E, b = ln B, c = ln C, beta, alpha).

  Raises ValueError unless the points are positive, s in [0, 1), and there are at least as many as parameters.
  """
  n, s, loss = (np.asarray(v, np.float64).ravel() for v in (n, s, loss))
  if not n.shape == s.shape == loss.shape:
    raise ValueError(f"n, s and loss must have one value per point, got {n.shape}, {s.shape}, {loss.shape}")
  if len(n) < 5:
    raise ValueError(f"fitting 5 constants needs at least 5 points, got {len(n)}")
  if np.any(n <= 0) or np.any(loss <= 0) or np.any((s < 0) | (s >= 1)):
    raise ValueError("points need n > 0, loss > 0 and sparsity in [0, 1)")
  args = (np.log(n), 1.0 / (1.0 - s), np.log(loss), delta)
  grid = {**DEFAULT_GRID, **(grid or {})}
  best, starts = None, 0
  for start in itertools.product(*(grid[k] for k in ("e", "b", "c", "beta", "alpha"))):
    starts += 1
    result = scipy.optimize.minimize(_objective, np.asarray(start, np.float64), args=args, jac=True,
                                     method="L-BFGS-B", options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-12})
    if np.isfinite(result.fun) and (best is None or result.fun < best.fun):
      best = result
  e, b, c, beta, alpha = best.x
  return Fit(ScalingLaw(E=float(np.exp(e)), B=float(np.exp(b)), C=float(np.exp(c)), beta=float(beta),
                        alpha=float(alpha)), objective=float(best.fun), starts=starts)


def optimal_sparsity(law: ScalingLaw, *, upper: float = 0.99) -> float:
  """The sparsity S* in [0, upper] that minimizes loss for a fixed number of activated parameters:
  argmin_S A(S) (1 − S)^α (independent of the budget; method.md §6)."""

  def log_cost(s):
    return np.log(law.B + law.C * np.exp(law.beta / (1 - s))) + law.alpha * np.log1p(-s)

  grid = np.linspace(0.0, upper, 2001)
  start = int(np.argmin(log_cost(grid)))
  lo, hi = grid[max(start - 1, 0)], grid[min(start + 1, len(grid) - 1)]
  if hi <= lo:
    return float(grid[start])
  result = scipy.optimize.minimize_scalar(log_cost, bounds=(lo, hi), method="bounded", options={"xatol": 1e-10})
  return float(result.x) if log_cost(result.x) <= log_cost(grid[start]) else float(grid[start])


def total_to_activated(s: float) -> float:
  """N / N_a at sparsity s: how many parameters a model holds per activated one (the paper: 1.84 at 45.58%)."""
  return 1.0 / (1.0 - s)
