"""Dense vs Q-Sparse accuracy through lm-evaluation-harness, on a multiple-choice task built from text every machine
has: given 3 lines of a Python standard-library module, which of 4 candidate lines comes next?

    python scripts/report_lm_eval.py [--steps 1000] [--qsparse DIR] [--dense DIR] [--items 500] [--seed 0]
                                     [--batch-size 32]

The task ("stdlib_next_line") is built deterministically (seeded) from the held-out part of the corpus the README's
tiny runs train on: data.source=python_stdlib keeps the last 5% of every top-level module (data.validation_fraction)
out of training (qsparse_jax.data.text.split_text). An item is 3 consecutive lines of that part and the line after
them (at least 12 characters without its indentation, its 4-line window absent from the file's training part);
the 3 distractors are lines drawn uniformly from the other modules' held-out parts (at least 12 characters too).
At most 4 items per module. The items and the
YAML go into a temporary folder read through TaskManager(include_path=...); the JSONL is kept with --keep DIR.

The two runs are the README's, trained longer (first if missing, or resumed up to --steps):

    qsparse train --config configs/tiny.py train.out_dir=/tmp/lmeval_runs/tiny_1000 train.steps=1000   # Q-Sparse
    qsparse train --config configs/pretrain_tiny_dense.py train.out_dir=/tmp/lmeval_runs/tiny_dense_1000 \
        train.steps=1000                                                                              # dense

The README's 300 steps end at about 2.2 nats/byte, where neither model tells a module's next line from other modules'
lines (both at chance); 1000 steps take about 20 minutes each on 2 CPU cores.

Prints each run's acc and acc_norm with standard errors (and the Q-Sparse run's weights evaluated dense, as
`qsparse lm-eval --compare-dense` does), the evaluation time, and ends with `qsparse_vs_dense_acc: <Q-Sparse acc /
dense acc>`.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
TASK = "stdlib_next_line"
VALIDATION_FRACTION = 0.05  # configs/tiny.py and configs/pretrain_tiny_dense.py
MIN_CHARS = 12
PER_FILE = 4
CHOICES = 4

YAML = f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {{path}}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def build_items(num_items: int, seed: int) -> list[dict]:
  """The task's items: {"context": 3 lines + "\\n", "choices": 4 lines, "label": index of the real one, "file"}."""
  from qsparse_jax.data import text

  held_out, windows = {}, {}
  for path in text.python_stdlib_files():
    train_part, validation_part = text.split_text(text.read_text_file(path), VALIDATION_FRACTION)
    held_out[path.name] = validation_part.split("\n")
    windows[path.name] = train_part
  pool = [(name, line) for name, lines in held_out.items() for line in lines if len(line.strip()) >= MIN_CHARS]
  rng = random.Random(seed)
  picked = []
  for name, lines in held_out.items():
    found = []
    for i in range(3, len(lines)):
      answer, context = lines[i], lines[i - 3:i]
      if len(answer.strip()) < MIN_CHARS or not any(c.strip() for c in context):
        continue
      if "\n".join(context + [answer]) in windows[name]:  # seen in training after all
        continue
      found.append((name, i))
    picked += rng.sample(found, min(PER_FILE, len(found)))
  rng.shuffle(picked)
  picked = picked[:num_items]
  if len(picked) < num_items:
    raise ValueError(f"only {len(picked)} items can be built (asked for {num_items})")
  items = []
  for name, i in picked:
    lines = held_out[name]
    answer = lines[i]
    distractors = []
    while len(distractors) < CHOICES - 1:  # lines of other modules, uniformly
      other, line = pool[rng.randrange(len(pool))]
      if other != name and line != answer and line not in distractors:
        distractors.append(line)
    label = rng.randrange(CHOICES)
    choices = distractors[:label] + [answer] + distractors[label:]
    items.append({"context": "\n".join(lines[i - 3:i]) + "\n", "choices": choices, "label": label, "file": name})
  return items


def write_task(folder: pathlib.Path, items: list[dict]) -> None:
  data = folder / f"{TASK}.jsonl"
  data.write_text("".join(json.dumps(item) + "\n" for item in items))
  (folder / f"{TASK}.yaml").write_text(YAML.format(path=data))


def ensure_run(run_dir: pathlib.Path, config: str, steps: int) -> None:
  """Trains run_dir with config up to `steps` (resuming its newest checkpoint) unless it has that step already."""
  saved = [int(p.name) for p in (run_dir / "checkpoints").glob("*") if p.name.isdigit()]
  if max(saved, default=0) >= steps:
    return
  command = ["train", "--config", str(ROOT / config), f"train.out_dir={run_dir}", f"train.steps={steps}"]
  print(f"{run_dir} has no step-{steps} checkpoint: training it (about 2 s per step on 2 CPU cores): qsparse "
        f"{' '.join(command)}", flush=True)
  from qsparse_jax import cli

  if cli.main(command) != 0:
    sys.exit(f"training {run_dir} failed")


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--steps", type=int, default=1000, help="train both runs to this step")
  parser.add_argument("--qsparse", help="the Q-Sparse run (configs/tiny.py; default /tmp/lmeval_runs/tiny_STEPS)")
  parser.add_argument("--dense", help="the dense run (configs/pretrain_tiny_dense.py; default "
                      "/tmp/lmeval_runs/tiny_dense_STEPS)")
  parser.add_argument("--items", type=int, default=500)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--keep", help="also write the task's JSONL and YAML into this folder")
  args = parser.parse_args()

  import logging

  import absl.logging

  from qsparse_jax.inference import harness
  from qsparse_jax.parallel.sharding import MeshConfig, make_mesh

  absl.logging.set_verbosity(absl.logging.ERROR)
  for name in ("lm_eval", "datasets", "huggingface_hub"):
    logging.getLogger(name).setLevel(logging.ERROR)
  qsparse_dir = pathlib.Path(args.qsparse or f"/tmp/lmeval_runs/tiny_{args.steps}")
  dense_dir = pathlib.Path(args.dense or f"/tmp/lmeval_runs/tiny_dense_{args.steps}")
  ensure_run(qsparse_dir, "configs/tiny.py", args.steps)
  ensure_run(dense_dir, "configs/pretrain_tiny_dense.py", args.steps)
  items = build_items(args.items, args.seed)
  if args.keep:
    pathlib.Path(args.keep).mkdir(parents=True, exist_ok=True)
    write_task(pathlib.Path(args.keep), items)
  print(f"{TASK}: {len(items)} items from {len({i['file'] for i in items})} standard-library modules' held-out "
        f"lines, {CHOICES} choices (chance 25%), seed {args.seed}")

  mesh = make_mesh(MeshConfig(), devices=[__import__("jax").devices()[0]])  # one CPU device: the fastest here
  specs = [harness.TaskSpec(TASK, 0, "acc")]
  with tempfile.TemporaryDirectory() as folder:
    write_task(pathlib.Path(folder), items)
    manager = harness.task_manager(folder, [TASK])
    runs = {}
    start = time.perf_counter()
    for label, run_dir in (("dense", dense_dir), ("qsparse", qsparse_dir)):
      model = harness.load_model(str(run_dir), mesh=mesh)
      for field in ("source", "validation_fraction"):
        value = getattr(model.config.data, field)
        if value != {"source": "python_stdlib", "validation_fraction": VALIDATION_FRACTION}[field]:
          print(f"warning: {run_dir} trained with data.{field}={value!r}: the items may not be held out from it")
      lm = harness.QSparseLM(model, batch_size=args.batch_size, mesh=mesh)
      runs[label] = (model, harness.evaluate(lm, specs, task_manager=manager))
      if label == "qsparse":
        runs["qsparse_as_dense"] = (model, harness.evaluate(lm.dense(), specs, task_manager=manager))
    seconds = time.perf_counter() - start

  def score(label: str, metric: str) -> harness.Score:
    return next(s for s in runs[label][1] if s.metric == metric)

  names = {"dense": f"dense run ({dense_dir}, step {runs['dense'][0].step})",
           "qsparse": f"Q-Sparse run ({qsparse_dir}, step {runs['qsparse'][0].step}), top-K as trained",
           "qsparse_as_dense": "Q-Sparse run's weights evaluated dense (every sparsity 0)"}
  for label, name in names.items():
    cells = "   ".join(f"{m} {score(label, m).value:.4f} ± {score(label, m).stderr:.4f}" for m in ("acc", "acc_norm"))
    print(f"{name}\n    {cells}")
  print(f"evaluated {3 * len(items) * CHOICES} loglikelihood requests (3 model settings x {len(items)} items x "
        f"{CHOICES} choices) in {seconds:.1f} s")
  print(f"qsparse_vs_dense_acc: {score('qsparse', 'acc').value / score('dense', 'acc').value:.4f}")


if __name__ == "__main__":
  main()
