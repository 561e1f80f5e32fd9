"""`qsparse scaling fit`: fit the scaling law to a sweep's results, for full-precision and 1.58-bit weights, print
the constants and the optimal sparsity beside the paper's, and draw loss-vs-activated-parameters and
loss-vs-sparsity plots (method.md §6)."""

from __future__ import annotations

import pathlib

import numpy as np

from qsparse_jax.research import scaling

PAPER_LABEL = {"full": "full precision", "ternary": "1.58-bit"}


def fit_families(rows: list[dict], *, grid: dict | None = None) -> dict[str, scaling.Fit]:
  """A scaling.Fit per weight precision present in rows (sweep.results); a family needs 5 finished runs."""
  fits = {}
  for precision in sorted({r["precision"] for r in rows}):
    points = _family(rows, precision)
    if len(points[0]) >= 5:
      fits[precision] = scaling.fit(*points, grid=grid)
  return fits


def loss_table(rows: list[dict]) -> str:
  """Validation loss per size and weight precision (rows) and sparsity (columns), the mean over seeds; with
  replicates, the largest relative difference between the seeds of one point (the run-to-run noise)."""
  sparsities = sorted({r["sparsity"] for r in rows})
  points: dict[tuple, list[float]] = {}
  for r in rows:
    points.setdefault((r["non_embedding"], r["size"], r["precision"], r["sparsity"]), []).append(r["val_loss"])
  header = " ".join(f"{'S=' + format(s, '.2f'):>8}" for s in sparsities)
  lines = [f"{'size':>6} {'non-emb':>8} {'weights':>8} {header}"]
  for n, size, precision in sorted({k[:3] for k in points}):
    cells = [points.get((n, size, precision, s)) for s in sparsities]
    lines.append(f"{size:>6} {n / 1e6:7.2f}M {precision:>8} " +
                 " ".join(f"{np.mean(c):8.4f}" if c else f"{'-':>8}" for c in cells))
  replicated = {k: v for k, v in points.items() if len(v) > 1}
  if replicated:
    key, losses = max(replicated.items(), key=lambda kv: (max(kv[1]) - min(kv[1])) / min(kv[1]))
    lines.append(f"{len(replicated)} of {len(points)} points with several seeds; the largest difference between "
                 f"seeds: {(max(losses) - min(losses)) / min(losses):.2%} ({key[1]}, {key[2]}, S={key[3]:.2f})")
  return "\n".join(lines)


def _family(rows: list[dict], precision: str) -> tuple[list[float], list[float], list[float]]:
  family = [r for r in rows if r["precision"] == precision]
  return [r["non_embedding"] for r in family], [r["sparsity"] for r in family], [r["val_loss"] for r in family]


def optimal_sparsity_spread(rows: list[dict], fits: dict[str, scaling.Fit]) -> dict[str, tuple[float, float]]:
  """Per family, the lowest and highest S* of the fits that leave out one run each (scaling.leave_one_out): how
  much S* depends on any single run. Families with fewer than 6 runs are left out."""
  spread = {}
  for precision, fit in fits.items():
    points = _family(rows, precision)
    if len(points[0]) >= 6:
      s_stars = [scaling.optimal_sparsity(law) for law in scaling.leave_one_out(*points, fit.law)]
      spread[precision] = (min(s_stars), max(s_stars))
  return spread


def report(fits: dict[str, scaling.Fit], spread: dict[str, tuple[float, float]] | None = None) -> str:
  """The constants of each fit and its optimal sparsity beside the paper's (with its leave-one-out range, when
  given spread from optimal_sparsity_spread)."""
  spread = spread or {}
  lines = [f"{'weights':>10} {'E':>7} {'B':>9} {'C':>9} {'beta':>8} {'alpha':>7} {'S*':>7} {'leave-one-out':>15} "
           f"{'paper S*':>9} {'N/N_a':>6}"]
  for precision, fit in fits.items():
    law, s_star = fit.law, scaling.optimal_sparsity(fit.law)
    paper = scaling.PAPER_OPTIMAL_SPARSITY[PAPER_LABEL[precision]]
    loo = "{:.1%}-{:.1%}".format(*spread[precision]) if precision in spread else "-"
    lines.append(f"{precision:>10} {law.E:7.4f} {law.B:9.4g} {law.C:9.4g} {law.beta:8.4f} {law.alpha:7.4f} "
                 f"{s_star:7.2%} {loo:>15} {paper:9.2%} {scaling.total_to_activated(s_star):6.2f}")
  return "\n".join(lines)


def plot(rows: list[dict], fits: dict[str, scaling.Fit], out_dir: str | pathlib.Path) -> list[pathlib.Path]:
  """loss_vs_activated.png and loss_vs_sparsity.png under out_dir: measured points and fitted curves."""
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError as err:
    raise ImportError("plots need matplotlib: pip install -e '.[plots]'") from err
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  sparsities = sorted({r["sparsity"] for r in rows})
  colors = {s: plt.cm.viridis(i / max(1, len(sparsities) - 1)) for i, s in enumerate(sparsities)}
  fig, axes = plt.subplots(1, len(fits) or 1, figsize=(6 * max(1, len(fits)), 4.5), squeeze=False)
  for ax, (precision, fit) in zip(axes[0], fits.items()):
    family = [r for r in rows if r["precision"] == precision]
    span = np.geomspace(min(r["activated"] for r in family) * 0.8, max(r["activated"] for r in family) * 1.25, 50)
    for s in sparsities:
      points = [r for r in family if r["sparsity"] == s]
      ax.scatter([r["activated"] for r in points], [r["val_loss"] for r in points], color=colors[s])
      ax.plot(span, fit.law.loss_at_activated(span, s), color=colors[s], label=f"S = {s:.0%}")
    ax.set(xscale="log", xlabel="activated parameters per token", ylabel="validation loss (nats/token)",
           title=f"{PAPER_LABEL[precision]} weights")
    ax.legend()
  first = out_dir / "loss_vs_activated.png"
  fig.tight_layout()
  fig.savefig(first, dpi=120)
  plt.close(fig)
  fig, ax = plt.subplots(figsize=(6, 4.5))
  grid = np.linspace(0, 0.85, 100)
  for precision, fit in fits.items():
    budget = np.median([r["activated"] for r in rows if r["precision"] == precision])
    curve = ax.plot(grid, fit.law.loss_at_activated(budget, grid), label=f"{PAPER_LABEL[precision]}, "
                    f"{budget / 1e6:.2f}M activated")[0]
    s_star = scaling.optimal_sparsity(fit.law)
    ax.axvline(s_star, color=curve.get_color(), linestyle=":")
    ax.axvline(scaling.PAPER_OPTIMAL_SPARSITY[PAPER_LABEL[precision]], color=curve.get_color(), linestyle="--",
               alpha=0.5)
  ax.set(xlabel="sparsity S", ylabel="predicted loss at a fixed activated budget",
         title="optimal sparsity: fitted (dotted) vs paper (dashed)")
  ax.legend()
  second = out_dir / "loss_vs_sparsity.png"
  fig.tight_layout()
  fig.savefig(second, dpi=120)
  plt.close(fig)
  return [first, second]
