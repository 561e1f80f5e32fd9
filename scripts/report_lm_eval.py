"""Dense vs Q-Sparse accuracy through lm-evaluation-harness, on two multiple-choice tasks built from text every
machine has: the held-out lines of Python's standard-library modules.

    python scripts/report_lm_eval.py [--steps 1000] [--qsparse DIR] [--dense DIR] [--items 400] [--seed 0]
                                     [--batch-size 32] [--keep DIR]

Both tasks are built deterministically (seeded) from the held-out part of the corpus the README's tiny runs train on:
data.source=python_stdlib keeps the last 5% of every top-level module (data.validation_fraction) out of training
(qsparse_jax.data.text.split_text). An item is 3 consecutive lines of that part and the line after them, whose
4-line window does not occur in the module's training part; at most 4 items per module, 4 choices (chance 25%).

- stdlib_identifier (the headline): the 4th line is cut before the first identifier (4 or more characters, not a
  keyword) that the 3 lines already use; the choices are that identifier and 3 identifiers of other modules' held-out
  lines (absent from the 3 lines, within 3 characters of its length), each followed by the rest of the line. A model
  that reads its context copies the name it has just seen.
- stdlib_next_line: which of 4 lines is the real 4th line (at least 12 characters without indentation), the 3 others
  drawn uniformly from the other modules' held-out lines (at least 12 characters too). Harder: a line's own
  likelihood outweighs how well it follows the context.

The items and YAMLs go into a temporary folder read through TaskManager(include_path=...); --keep DIR keeps them
(`qsparse lm-eval --include-path DIR --tasks stdlib_identifier ...` then runs the same evaluation).

The two runs are the README's, trained longer (first if missing, or resumed up to --steps):

    qsparse train --config configs/tiny.py train.out_dir=/tmp/lmeval_runs/tiny_1000 train.steps=1000   # Q-Sparse
    qsparse train --config configs/pretrain_tiny_dense.py train.out_dir=/tmp/lmeval_runs/tiny_dense_1000 \
        train.steps=1000                                                                              # dense

1000 steps take about 20 minutes each on 2 CPU cores. Prints each run's acc and acc_norm per task with standard errors
(and the Q-Sparse run's weights evaluated dense, as `qsparse lm-eval --compare-dense` does), the evaluation time, and
ends with `qsparse_vs_dense_acc: <Q-Sparse acc / dense acc on stdlib_identifier>`.
"""

from __future__ import annotations

import argparse
import json
import keyword
import pathlib
import random
import re
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
IDENTIFIER, NEXT_LINE = "stdlib_identifier", "stdlib_next_line"
TASKS = (IDENTIFIER, NEXT_LINE)
VALIDATION_FRACTION = 0.05  # configs/tiny.py and configs/pretrain_tiny_dense.py
MIN_CHARS = 12
PER_FILE = 4
CHOICES = 4

YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
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


WORD = re.compile(r"\b[A-Za-z_][A-Za-z0-9_]{3,}\b")  # identifiers of 4 or more characters
NOT_NAMES = set(keyword.kwlist) | {"self", "None", "True", "False", "print"}


def held_out_lines() -> tuple[dict[str, list[str]], dict[str, str]]:
  """({module file name: its held-out lines}, {module file name: its training part}), as the runs split them."""
  from qsparse_jax.data import text

  held_out, training = {}, {}
  for path in text.python_stdlib_files():
    train_part, validation_part = text.split_text(text.read_text_file(path), VALIDATION_FRACTION)
    held_out[path.name], training[path.name] = validation_part.split("\n"), train_part
  return held_out, training


def names_in(text: str) -> set[str]:
  return set(WORD.findall(text)) - NOT_NAMES


def pick(candidates: dict[str, list], num_items: int, rng: random.Random) -> list:
  """At most PER_FILE candidates of each module, shuffled, num_items of them."""
  picked = [c for found in candidates.values() for c in rng.sample(found, min(PER_FILE, len(found)))]
  rng.shuffle(picked)
  if len(picked) < num_items:
    raise ValueError(f"only {len(picked)} items can be built (asked for {num_items})")
  return picked[:num_items]


def windows(held_out, training, name):
  """(i, context lines, the line after them) of a module's held-out lines, windows unseen in training."""
  lines = held_out[name]
  for i in range(3, len(lines)):
    if any(c.strip() for c in lines[i - 3:i]) and "\n".join(lines[i - 3:i + 1]) not in training[name]:
      yield i, lines[i - 3:i], lines[i]


def item(context: str, right: str, wrong: list[str], name: str, rng: random.Random) -> dict:
  label = rng.randrange(CHOICES)
  return {"context": context, "choices": wrong[:label] + [right] + wrong[label:], "label": label, "file": name}


def identifier_items(held_out, training, num_items: int, seed: int) -> list[dict]:
  """stdlib_identifier: {"context": 3 lines + the 4th up to a name they use, "choices": that name and 3 others, each
  with the rest of the line, "label", "file"}."""
  rng = random.Random(seed)
  candidates = {}
  for name in held_out:
    candidates[name] = []
    for i, context, line in windows(held_out, training, name):
      used = names_in("\n".join(context))
      first = next((m for m in WORD.finditer(line) if m.group() in used), None)
      if first is not None:
        candidates[name].append((name, i, first.start(), first.group()))
  pool = sorted({(name, word) for name, lines in held_out.items() for word in names_in("\n".join(lines))})
  items = []
  for name, i, start, word in pick(candidates, num_items, rng):
    lines = held_out[name]
    used, rest = names_in("\n".join(lines[i - 3:i])), lines[i][start + len(word):]
    others = []
    while len(others) < CHOICES - 1:
      other, candidate = pool[rng.randrange(len(pool))]
      if other != name and candidate not in used and candidate not in others and abs(len(candidate) - len(word)) <= 3:
        others.append(candidate)
    items.append(item("\n".join(lines[i - 3:i]) + "\n" + lines[i][:start], word + rest, [o + rest for o in others],
                      name, rng))
  return items


def next_line_items(held_out, training, num_items: int, seed: int) -> list[dict]:
  """stdlib_next_line: {"context": 3 lines + "\\n", "choices": 4 lines, "label": index of the real one, "file"}."""
  rng = random.Random(seed)
  long_enough = lambda line: len(line.strip()) >= MIN_CHARS  # noqa: E731
  candidates = {name: [(name, i) for i, _, line in windows(held_out, training, name) if long_enough(line)]
                for name in held_out}
  pool = [(name, line) for name, lines in held_out.items() for line in lines if long_enough(line)]
  items = []
  for name, i in pick(candidates, num_items, rng):
    lines = held_out[name]
    others = []
    while len(others) < CHOICES - 1:  # lines of other modules, uniformly
      other, line = pool[rng.randrange(len(pool))]
      if other != name and line != lines[i] and line not in others:
        others.append(line)
    items.append(item("\n".join(lines[i - 3:i]) + "\n", lines[i], others, name, rng))
  return items


def write_task(folder: pathlib.Path, task: str, items: list[dict]) -> None:
  data = folder / f"{task}.jsonl"
  data.write_text("".join(json.dumps(item) + "\n" for item in items))
  (folder / f"{task}.yaml").write_text(YAML.format(task=task, path=data))


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
  parser.add_argument("--items", type=int, default=400, help="items per task")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--keep", help="also write the tasks' JSONL and YAML files into this folder")
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
  held_out, training = held_out_lines()
  tasks = {IDENTIFIER: identifier_items(held_out, training, args.items, args.seed),
           NEXT_LINE: next_line_items(held_out, training, args.items, args.seed)}
  for task, items in tasks.items():
    if args.keep:
      pathlib.Path(args.keep).mkdir(parents=True, exist_ok=True)
      write_task(pathlib.Path(args.keep), task, items)
    print(f"{task}: {len(items)} items from {len({i['file'] for i in items})} standard-library modules' held-out "
          f"lines, {CHOICES} choices (chance 25%), seed {args.seed}")

  mesh = make_mesh(MeshConfig(), devices=[__import__("jax").devices()[0]])  # one CPU device: the fastest here
  specs = [harness.TaskSpec(task, 0, "acc") for task in TASKS]
  with tempfile.TemporaryDirectory() as folder:
    for task, items in tasks.items():
      write_task(pathlib.Path(folder), task, items)
    manager = harness.task_manager(folder, list(TASKS))
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

  def score(label: str, task: str, metric: str) -> harness.Score:
    return next(s for s in runs[label][1] if s.task == task and s.metric == metric)

  names = {"dense": f"dense run ({dense_dir}, step {runs['dense'][0].step})",
           "qsparse": f"Q-Sparse run ({qsparse_dir}, step {runs['qsparse'][0].step}), top-K as trained",
           "qsparse_as_dense": "Q-Sparse run's weights evaluated dense (every sparsity 0)"}
  for label, name in names.items():
    print(name)
    for task in TASKS:
      cells = "   ".join(f"{m} {score(label, task, m).value:.4f} ± {score(label, task, m).stderr:.4f}"
                         for m in ("acc", "acc_norm"))
      print(f"    {task:<18} {cells}")
  requests = sum(len(items) for items in tasks.values()) * CHOICES * 3
  print(f"evaluated {requests} loglikelihood requests (3 model settings x {' + '.join(str(len(i)) for i in tasks.values())}"
        f" items x {CHOICES} choices) in {seconds:.1f} s")
  ratio = score("qsparse", IDENTIFIER, "acc").value / score("dense", IDENTIFIER, "acc").value
  print(f"qsparse_vs_dense_acc: {ratio:.4f}")

if __name__ == "__main__":
  main()
