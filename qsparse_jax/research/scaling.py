"""The Q-Sparse scaling law and its inference-optimal sparsity (method.md §6).

    L(N, S) = E + A(S) / N^α,    A(S) = B + C · exp(β / (1 − S))

N is the model's non-embedding parameter count, S the sparsity. The fit follows the paper (and Chinchilla's
approach 3): with e = ln E, b = ln B, c = ln C, the predicted log loss is

    ln L̂ = LSE(e, b − α ln N, c + β / (1 − S) − α ln N)

and θ = (e, b, c, β, α) minimizes Σ Huber_δ(ln L̂ − ln L) with δ = 1e-3, by L-BFGS from every point of a grid of
starting values, keeping the best. The objective is a long flat valley on a few dozen noisy points (E and α trade
off against each other), so L-BFGS takes ~1000 steps to converge from each start; `fit` runs every start for
`coarse_steps` and polishes only the `polish` best to convergence, which finds the same minimum several times
faster. With activated parameters N_a = N (1 − S) the law becomes
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
CONVERGE_STEPS = 20_000  # L-BFGS steps allowed to a run that should converge


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


DEFAULT_GRID = {  # 3^5 = 243 starts
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
  starts: int  # grid points L-BFGS started from


def _lbfgs(start: np.ndarray, args: tuple, max_steps: int) -> scipy.optimize.OptimizeResult:
  return scipy.optimize.minimize(_objective, start, args=args, jac=True, method="L-BFGS-B",
                                 options={"maxiter": max_steps, "ftol": 1e-15, "gtol": 1e-12})


def _points(n, s, loss) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  n, s, loss = (np.asarray(v, np.float64).ravel() for v in (n, s, loss))
  if not n.shape == s.shape == loss.shape:
    raise ValueError(f"n, s and loss must have one value per point, got {n.shape}, {s.shape}, {loss.shape}")
  if len(n) < 5:
    raise ValueError(f"fitting 5 constants needs at least 5 points, got {len(n)}")
  if np.any(n <= 0) or np.any(loss <= 0) or np.any((s < 0) | (s >= 1)):
    raise ValueError("points need n > 0, loss > 0 and sparsity in [0, 1)")
  return n, s, loss


def _law(theta: np.ndarray) -> ScalingLaw:
  e, b, c, beta, alpha = (float(v) for v in theta)
  return ScalingLaw(E=float(np.exp(e)), B=float(np.exp(b)), C=float(np.exp(c)), beta=beta, alpha=alpha)


def fit(n: Sequence[float], s: Sequence[float], loss: Sequence[float], *, grid: dict | None = None,
        delta: float = HUBER_DELTA, coarse_steps: int = 150, polish: int = 8) -> Fit:
  """The ScalingLaw that best fits (n, s, loss) points, by L-BFGS from every point of grid (DEFAULT_GRID: values
  of e = ln E, b = ln B, c = ln C, beta, alpha): `coarse_steps` steps from each start, then the `polish` lowest
  continued to convergence.

  Raises ValueError unless the points are positive, s in [0, 1), and there are at least as many as parameters.
  """
  n, s, loss = _points(n, s, loss)
  args = (np.log(n), 1.0 / (1.0 - s), np.log(loss), delta)
  grid = {**DEFAULT_GRID, **(grid or {})}
  names = ("e", "b", "c", "beta", "alpha")
  starts = [np.asarray(p, np.float64) for p in itertools.product(*(grid[k] for k in names))]
  coarse = [r for r in (_lbfgs(p, args, coarse_steps) for p in starts) if np.isfinite(r.fun)]
  if not coarse:
    raise ValueError(f"no starting point of the grid gave a finite objective on these {len(n)} points")
  coarse.sort(key=lambda r: r.fun)
  polished = [r if r.success else _lbfgs(r.x, args, CONVERGE_STEPS) for r in coarse[:polish]]
  best = min(polished, key=lambda r: r.fun)
  return Fit(_law(best.x), objective=float(best.fun), starts=len(starts))


def leave_one_out(n: Sequence[float], s: Sequence[float], loss: Sequence[float], law: ScalingLaw, *,
                  delta: float = HUBER_DELTA) -> list[ScalingLaw]:
  """The law refitted on the points without point i, for each i, by L-BFGS from `law` (the fit on all of them):
  how far one run moves the constants, and S*, shows how well the points pin them down."""
  n, s, loss = _points(n, s, loss)
  with np.errstate(divide="ignore"):  # B or C fitted to 0 starts from ln 0 = -inf: clip to a tiny value
    start = np.maximum(np.log([law.E, law.B, law.C]), -50.0)
  start = np.concatenate([start, [law.beta, law.alpha]])
  laws = []
  for i in range(len(n)):
    keep = np.arange(len(n)) != i
    result = _lbfgs(start, (np.log(n[keep]), 1.0 / (1.0 - s[keep]), np.log(loss[keep]), delta), CONVERGE_STEPS)
    laws.append(_law(result.x))
  return laws


def optimal_sparsity(law: ScalingLaw, *, upper: float = 0.99) -> float:
  """The sparsity S* in [0, upper] that minimizes loss for a fixed number of activated parameters:
  argmin_S A(S) (1 − S)^α (independent of the budget; method.md §6)."""

  def log_cost(s):  # exp overflows to inf near S = 1 for large β: that grid point is simply not the minimum
    with np.errstate(over="ignore"):
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
