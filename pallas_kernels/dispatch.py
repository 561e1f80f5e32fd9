"""The one backend setting shared by every op: "auto" | "xla" | "pallas"."""

from __future__ import annotations

from typing import Literal

import jax

Backend = Literal["auto", "xla", "pallas"]
BACKENDS = ("auto", "xla", "pallas")


def resolve(backend: str, *, pallas_platforms: tuple[str, ...]) -> tuple[str, bool]:
  """(implementation, interpret) for this process's default platform.

  "auto" picks the Pallas kernel on the platforms in pallas_platforms (those it is written for) and the XLA path
  elsewhere, the CPU included; "pallas" on a platform without a compiled kernel runs it in interpret mode (slow:
  for tests).
  """
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
  platform = jax.default_backend()
  if backend == "xla" or (backend == "auto" and platform not in pallas_platforms):
    return "xla", False
  return "pallas", platform not in pallas_platforms
