"""The `qsparse` command.

    qsparse train --config configs/tiny.py [section.field=value ...]
    qsparse train --distributed --config configs/paper_7b.py ...   (every process of a multi-host job)

Any config field can be overridden, e.g. `train.steps=200 model.sparsity_down=0.5 data.source=files
data.paths="['notes.txt']"`. Bad input (an unknown field, a wrong type, a missing file, a checkpoint from another
model) ends with one line naming what is wrong, and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

# Quiet TFDS / absl chatter before they are imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _train(args) -> int:
  import absl.logging
  import tensorflow_datasets as tfds

  from qsparse_jax.config import apply_overrides, load_preset
  from qsparse_jax.train import train

  absl.logging.set_verbosity(absl.logging.FATAL)  # library tracebacks become the one-line errors below
  tfds.disable_progress_bar()
  config = apply_overrides(load_preset(args.config), args.overrides)
  if args.dry_run:
    print(config)
    return 0
  if args.distributed:
    from qsparse_jax import distributed

    distributed.initialize()
  result = train(config)
  import jax

  if jax.process_index() == 0:
    print(f"final: step {result['step']}, train loss {result.get('loss', float('nan')):.4f}, "
          f"validation loss {result.get('val_loss', float('nan')):.4f}")
  return 0


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="qsparse", description="Q-Sparse language models in JAX")
  sub = parser.add_subparsers(dest="command", required=True)
  p_train = sub.add_parser("train", help="train (or resume) a model from a preset config")
  p_train.add_argument("--config", required=True, help="preset file, e.g. configs/tiny.py")
  p_train.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
  p_train.add_argument("--distributed", action="store_true",
                       help="join a multi-process job (TPU pod, SLURM, or JAX_COORDINATOR_ADDRESS / "
                            "JAX_NUM_PROCESSES / JAX_PROCESS_ID) before training")
  p_train.add_argument("overrides", nargs="*", help="section.field=value overrides")
  args = parser.parse_args(argv)
  try:
    return {"train": _train}[args.command](args)
  except (ValueError, FileNotFoundError) as err:
    print(f"qsparse {args.command}: error: {err}", file=sys.stderr)
    return 2
  except OSError as err:  # a full disk during a save (CheckpointSaveError says which checkpoint is intact)
    print(f"qsparse {args.command}: error: {err}", file=sys.stderr)
    # The failed save's abandoned asyncio tasks would log tracebacks while the interpreter shuts down; everything
    # of ours is closed, so leave without that teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)
  except KeyboardInterrupt:
    print(f"qsparse {args.command}: interrupted; the last checkpoint is kept", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
