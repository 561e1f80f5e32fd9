"""The `qsparse` command.

    qsparse train --config configs/tiny.py [section.field=value ...]
    qsparse train --distributed --config configs/paper_7b.py ...   (every process of a multi-host job)
    qsparse generate --checkpoint runs/tiny --prompt "def main():" [--max-new-tokens 200 --temperature 0.8]
    qsparse eval --checkpoint runs/tiny [--batches 16 --json eval.json] [data.field=value ...]
    qsparse lm-eval --checkpoint runs/tiny|hf:DIR --tasks arc_challenge,hellaswag|paper [--compare-dense ...]
    qsparse export-hf --checkpoint runs/continue_tiny --out exported/ [--arch llama --dtype bfloat16]
    qsparse compile --config configs/paper_7b.py --topology v5p-128   (does it fit? compiled for TPU, no TPU needed)
    qsparse compile --decode --batch 8 --config configs/paper_1p3b.py --topology h200x1   (GPUs: in .venv-cuda)
    qsparse scaling sweep --sweep configs/scaling_sweep.py        (trains what is not finished; resumable)
    qsparse scaling fit --sweep configs/scaling_sweep.py [--plots docs/]

Any config field can be overridden, e.g. `train.steps=200 model.sparsity_down=0.5 data.source=files
data.paths="['notes.txt']"`. Bad input (an unknown field, a wrong type, a missing file, a checkpoint from another
model) ends with one line naming what is wrong, and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import warnings

# Quiet TFDS / absl chatter before they are imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _train(args) -> int:
  import absl.logging
  import tensorflow_datasets as tfds

  from qsparse_jax.config import apply_overrides, load_preset
  from qsparse_jax.training.loop import train

  absl.logging.set_verbosity(absl.logging.FATAL)  # library tracebacks become the one-line errors below
  tfds.disable_progress_bar()
  config = apply_overrides(load_preset(args.config), args.overrides)
  if args.dry_run:
    print(config)
    return 0
  if args.distributed:
    from qsparse_jax.parallel import distributed

    distributed.initialize()
  train(config)
  return 0


def _generate(args) -> int:
  import absl.logging

  from qsparse_jax import inference
  from qsparse_jax.data import chat
  from qsparse_jax.inference import decode

  absl.logging.set_verbosity(absl.logging.FATAL)
  if (args.prompt is None) == (args.prompts_file is None):
    raise ValueError("give exactly one of --prompt TEXT and --prompts-file FILE")
  if args.prompts_file is not None:
    path = pathlib.Path(args.prompts_file)
    if not path.is_file():
      raise FileNotFoundError(f"prompts file {str(path)!r} does not exist")
    prompts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
      raise ValueError(f"prompts file {str(path)!r} has no prompts (one per line)")
  else:
    prompts = [args.prompt]
  if any(not p for p in prompts):
    raise ValueError("the prompt is empty: give some text to continue")
  loaded = inference.load(args.checkpoint, step=args.step, tokenizer=args.tokenizer)
  tok = loaded.tokenizer
  stop = tuple(args.stop)
  if args.chat:  # each prompt as a user message in the template the model was fine-tuned with
    if loaded.config.data.format != "instructions":
      raise ValueError("--chat: this checkpoint was not fine-tuned on instructions (its data.format is "
                       f"{loaded.config.data.format!r}); leave --chat out to continue plain text")
    template = chat.get_template(loaded.config.data.chat_template)
    prompts = [chat.generation_prompt(p, template) for p in prompts]
    end_of_turn = template.footers["assistant"].strip()
    stop += (end_of_turn,) if end_of_turn else ()
  sampling = decode.SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                   top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=stop)
  ids = [tok.encode(p) for p in prompts]
  if any(len(i) == 0 for i in ids):
    raise ValueError("the prompt encodes to no tokens: give some text to continue")
  decode.check_request(loaded.config.model, ids, sampling, decode_text=tok.decode)  # before any text is shown
  streaming = len(prompts) == 1
  shown = {"ids": [], "text": ""}

  def stream(tokens):
    if tokens[0] is None:
      return
    shown["ids"].append(tokens[0])
    text = tok.decode(shown["ids"])
    if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
      sys.stdout.write(text[len(shown["text"]):])
      sys.stdout.flush()
      shown["text"] = text

  if streaming:
    sys.stdout.write(prompts[0])
    sys.stdout.flush()
  result = decode.generate(loaded.graphdef, loaded.params, loaded.config.model, ids, sampling,
                           decode_text=tok.decode, sparse=not args.dense, on_tokens=stream if streaming else None)
  if streaming:
    rest = tok.decode(result.tokens[0])[len(shown["text"]):]
    print(rest if (shown["text"] + rest).endswith("\n") else rest + "\n", end="", flush=True)
  else:
    for prompt, new in zip(prompts, result.tokens):
      print(prompt + tok.decode(new) + "\n")
  count = sum(map(len, result.tokens))
  how = "dense" if args.dense else "sparse"
  weights = ", ternary weights packed 2 bits each" if loaded.packed else ""
  print(f"{count} tokens, decoding at {result.tokens_per_second:.1f} tokens/s "
        f"({how} decode{weights}, batch {len(prompts)}, checkpoint step {loaded.step})", file=sys.stderr)
  return 0


def _scaling(args) -> int:
  import json

  from qsparse_jax.research import scaling, scaling_report, sweep

  plan = sweep.load_sweep(args.sweep)
  if args.action == "sweep":
    import absl.logging
    import tensorflow_datasets as tfds

    absl.logging.set_verbosity(absl.logging.FATAL)
    tfds.disable_progress_bar()
    sweep.run_sweep(plan)
    return 0
  rows = sweep.results(plan)
  if args.seed is not None:
    if args.seed not in plan.seeds:
      raise ValueError(f"--seed {args.seed}: the sweep {args.sweep} has seeds {plan.seeds}")
    rows = [r for r in rows if r["seed"] == args.seed]
  fits = scaling_report.fit_families(rows)
  if not fits:
    raise ValueError(f"{len(rows)} finished runs under {plan.out_dir}; a fit needs 5 of one weight precision: run "
                     f"`qsparse scaling sweep --sweep {args.sweep}` first")
  print(f"{len(rows)} runs from {plan.out_dir}" + ("" if args.seed is None else f" (seed {args.seed})"))
  print(scaling_report.loss_table(rows))
  spread = scaling_report.optimal_sparsity_spread(rows, fits)
  print(scaling_report.report(fits, spread))
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps({"runs": rows, "fits": {
        p: {**f.law.as_dict(), "optimal_sparsity": scaling.optimal_sparsity(f.law),
            "optimal_sparsity_leave_one_out": spread.get(p)} for p, f in fits.items()}}, indent=2))
  if args.plots:
    for path in scaling_report.plot(rows, fits, args.plots):
      print(f"wrote {path}")
  return 0


def _eval(args) -> int:
  import absl.logging
  import tensorflow_datasets as tfds

  from qsparse_jax import inference
  from qsparse_jax.config import apply_overrides
  from qsparse_jax.inference import evaluation

  absl.logging.set_verbosity(absl.logging.FATAL)
  tfds.disable_progress_bar()
  bad = [o for o in args.overrides if not o.strip().startswith(("data.", "model."))]
  if bad:
    raise ValueError(f"eval takes data.* overrides (the text to measure on) and model.* sparsity overrides (e.g. "
                     f"model.sparsity=0 for the dense loss), got {bad[0]!r}")
  for name in ("batches", "batch_size"):
    if getattr(args, name) is not None and getattr(args, name) < 1:
      raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
  loaded = inference.load(args.checkpoint, step=args.step, pack=False)  # the forward it was trained with
  config = apply_overrides(loaded.config, args.overrides)
  if config.model != loaded.config.model:
    loaded = inference.with_model(loaded, config.model)
  batches = evaluation.validation_batches(
      config, loaded.tokenizer, num_batches=args.batches or config.train.eval_batches,
      batch_size=args.batch_size or config.train.batch_size)
  result = evaluation.evaluate(loaded.graphdef, loaded.params, config.model, batches, step=loaded.step)
  if args.json == "-":
    print(result.dumps())
    return 0
  print(result.table(loaded.tokenizer.unit))
  if args.json is not None:
    pathlib.Path(args.json).write_text(result.dumps() + "\n")
    print(f"wrote {args.json}")
  return 0


def _lm_eval(args) -> int:
  import json
  import logging

  import absl.logging

  try:
    from qsparse_jax.inference import harness
  except ModuleNotFoundError as err:
    if err.name is None or not err.name.startswith("lm_eval"):
      raise
    raise ValueError("qsparse lm-eval needs lm-evaluation-harness: pip install 'qsparse-jax[eval]'") from None

  absl.logging.set_verbosity(absl.logging.FATAL)
  if not args.debug:  # the harness's and the Hub client's notes and retries would bury the table and the errors
    for name in ("lm_eval", "lm-eval", "datasets", "huggingface_hub", "evaluate"):
      logging.getLogger(name).setLevel(logging.ERROR)
  if args.batch_size < 1:
    raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
  if args.limit is not None and args.limit <= 0:
    raise ValueError(f"--limit must be positive, got {args.limit}")
  specs = harness.parse_tasks(args.tasks, args.num_fewshot)
  manager = harness.task_manager(args.include_path, [s.name for s in specs])
  mesh = harness.make_eval_mesh(args.overrides)
  model = harness.load_model(args.checkpoint, overrides=args.overrides, step=args.step, mesh=mesh)
  lm = harness.QSparseLM(model, batch_size=args.batch_size, mesh=mesh, max_gen_toks=args.max_gen_toks)
  limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
  try:
    scores = harness.evaluate(lm, specs, task_manager=manager, limit=limit)
    dense = harness.evaluate(lm.dense(), specs, task_manager=manager, limit=limit) if args.compare_dense else None
  except ConnectionError as err:  # a Hub dataset while offline: `datasets` names it
    _say(f"qsparse lm-eval: error: a task's dataset cannot be downloaded: {err}; the harness's own tasks fetch "
         "their data from the Hugging Face Hub once (then ~/.cache/huggingface); offline, evaluate local tasks "
         "(--include-path DIR)")
    return 1
  cfg = model.config.model
  sites = ", ".join(f"{name} {cfg.site_keep_counts()[name][1]}/{cfg.site_keep_counts()[name][0]}"
                    for name in ("qkv", "out", "up", "down"))
  mesh_shape = " x ".join(f"{axis} {size}" for axis, size in lm.mesh.shape.items())
  print(f"{args.checkpoint} (step {model.step}): kept entries per site {sites}; mesh {mesh_shape}, batch "
        f"{lm.batch_size}")
  print(harness.table(scores, dense, label=harness.sparsity_label(cfg), specs=specs))
  if args.json is not None:
    payload = {"checkpoint": args.checkpoint, "step": model.step, **harness.scores_json(scores, dense)}
    pathlib.Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.json}")
  return 0


def _export_hf(args) -> int:
  import absl.logging
  import jax.numpy as jnp

  from qsparse_jax import hf, inference

  absl.logging.set_verbosity(absl.logging.FATAL)
  loaded = inference.load(args.checkpoint, step=args.step, pack=False)
  hf.to_hf(loaded.config.model, args.arch)  # an unexportable model fails before anything is read or written
  out = hf.save_pretrained(args.out, loaded.config.model, loaded.params, kind=args.arch,
                           dtype={"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype])
  print(f"wrote {out} (Hugging Face {args.arch or 'default'} layout, {args.dtype}, checkpoint step {loaded.step})")
  return 0


def _compile(args) -> int:
  # Deviceless: compile for the slice from this host, whatever it is (libtpu's lock and metadata server are for
  # hosts that own TPUs; the CUDA plugin's check of the installed CUDA libraries is for hosts that run on GPUs).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
  import absl.logging

  from qsparse_jax.config import apply_overrides, load_preset
  from qsparse_jax.training import compile as aot

  absl.logging.set_verbosity(absl.logging.FATAL)
  config = apply_overrides(load_preset(args.config), args.overrides)
  aot.check_platform(aot.parse_slice(args.topology))  # a bad name or a missing compiler fails before any compile
  if args.decode:
    report = aot.compile_decode(config, args.topology, args.batch, args.context)
  else:
    report = aot.compile_for(config, args.topology)
  print("\n".join(report.lines()))
  if not report.fits:
    what = f"its decode step at batch {args.batch}" if args.decode else args.config
    todo = "try a smaller --batch or --context, or a larger slice" if args.decode else aot.advice(config)
    _say(f"qsparse compile: error: {what} does not fit {args.topology} ({report.error}); {todo}")
    return 1
  print(f"hbm_fraction: {report.hbm_fraction:.3f}")
  return 0


def _show_warning(command: str):
  """warnings.showwarning that prints ours (qsparse_jax's) as one line `qsparse COMMAND: warning: ...`."""
  default = warnings.showwarning

  def show(message, category, filename, lineno, file=None, line=None):
    if category.__module__.startswith("qsparse_jax"):
      _say(f"qsparse {command}: warning: {message}")
    else:
      default(message, category, filename, lineno, file, line)

  return show


def main(argv: list[str] | None = None) -> int:
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--debug", action="store_true", help="show the full traceback of an error")
  parser = argparse.ArgumentParser(prog="qsparse", description="Q-Sparse language models in JAX")
  sub = parser.add_subparsers(dest="command", required=True)

  def add(name: str, **kwargs) -> argparse.ArgumentParser:  # every subcommand takes --debug
    return sub.add_parser(name, parents=[common], **kwargs)

  step_help = ("the checkpoint step to use (default: the newest that restores, passing over damaged ones with a "
               "warning)")
  p_train = add("train", help="train (or resume) a model from a preset config")
  p_train.add_argument("--config", required=True, help="preset file, e.g. configs/tiny.py")
  p_train.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
  p_train.add_argument("--distributed", action="store_true",
                       help="join a multi-process job (TPU pod, SLURM, or JAX_COORDINATOR_ADDRESS / "
                            "JAX_NUM_PROCESSES / JAX_PROCESS_ID) before training")
  p_train.add_argument("overrides", nargs="*", help="section.field=value overrides")
  p_gen = add("generate", help="continue a prompt with a trained model (KV cache, sparse decode)")
  p_gen.add_argument("--checkpoint", required=True, help="run directory of `qsparse train` (or its checkpoints/)")
  p_gen.add_argument("--prompt", help="text to continue; streamed to the terminal as it is written")
  p_gen.add_argument("--prompts-file", help="a file with one prompt per line, decoded as one batch")
  p_gen.add_argument("--step", type=int, help=step_help)
  p_gen.add_argument("--max-new-tokens", type=int, default=200)
  p_gen.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
  p_gen.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
  p_gen.add_argument("--top-p", type=float, default=1.0, help="sample within this much probability mass")
  p_gen.add_argument("--seed", type=int, default=0)
  p_gen.add_argument("--stop", action="append", default=[], help="end a row when its text ends with this (repeatable)")
  p_gen.add_argument("--tokenizer", help="refuse to run unless the checkpoint was trained with this tokenizer")
  p_gen.add_argument("--dense", action="store_true", help="decode with dense projections (for comparison)")
  p_gen.add_argument("--chat", action="store_true", help="ask each prompt as a user message in the chat template "
                     "the checkpoint was fine-tuned with (data.chat_template), stopping at its end of turn")
  p_eval = add("eval", help="validation loss and measured sparsity per projection (the paper's Table 2)")
  p_eval.add_argument("--checkpoint", required=True, help="run directory of `qsparse train` (or its checkpoints/)")
  p_eval.add_argument("--step", type=int, help=step_help)
  p_eval.add_argument("--batches", type=int, help="validation batches to measure on (default: train.eval_batches)")
  p_eval.add_argument("--batch-size", type=int, help="sequences per batch (default: train.batch_size)")
  p_eval.add_argument("--json", help="also write the figures as JSON to this file ('-': print JSON instead)")
  p_eval.add_argument("overrides", nargs="*", help="data.field=value: measure on other text (e.g. "
                      "data.paths=notes.txt); model.sparsity*=S: at another sparsity (model.sparsity=0: dense)")
  p_lm = add("lm-eval", help="zero- and few-shot accuracy on lm-evaluation-harness tasks, sparse and dense (the "
              "paper's Tables 1 and 4); needs the eval extra")
  p_lm.add_argument("--checkpoint", required=True, help="run directory of `qsparse train`, or hf:DIR (a Hugging Face "
                    "checkpoint with its tokenizer)")
  p_lm.add_argument("--tasks", required=True, help="comma-separated lm-eval tasks or groups (arc_challenge,hellaswag,"
                    "...), or 'paper': ARC-C 25-shot, HellaSwag 10, MMLU 5, WinoGrande 5, TruthfulQA (mc2) 0")
  p_lm.add_argument("--num-fewshot", type=int, help="shots for every task (default: each task's own, or the paper's)")
  p_lm.add_argument("--limit", type=float, help="evaluate only the first N documents of each task (a fraction if < 1)")
  p_lm.add_argument("--batch-size", type=int, default=16, help="sequences per model call (default 16)")
  p_lm.add_argument("--max-gen-toks", type=int, default=256, help="generation tasks: default new-token limit when "
                    "a task sets none")
  p_lm.add_argument("--json", help="also write the scores as JSON to this file")
  p_lm.add_argument("--compare-dense", action="store_true", help="also evaluate the same weights with every sparsity "
                    "set to 0, and print both columns and their difference")
  p_lm.add_argument("--include-path", help="a folder of local task YAMLs to add to the harness's own")
  p_lm.add_argument("--step", type=int, help=step_help)
  p_lm.add_argument("overrides", nargs="*", help="model.*=V: the Q-Sparse settings to evaluate at (model.sparsity=0.6 "
                    "sets every site; an hf: checkpoint comes in dense unless its config.json records them); "
                    "mesh.*=N: the mesh (default data-parallel over every device; mesh.data=1 mesh.fsdp=-1 splits a "
                    "large model's weights)")
  p_exp = add("export-hf", help="write a run's latest weights as a Hugging Face checkpoint")
  p_exp.add_argument("--checkpoint", required=True, help="run directory of `qsparse train` (or its checkpoints/)")
  p_exp.add_argument("--step", type=int, help=step_help)
  p_exp.add_argument("--out", required=True, help="a new directory for config.json and the safetensors")
  p_exp.add_argument("--arch", choices=["llama", "mistral", "qwen2"],
                     help="architecture of config.json (default: qwen2 with q/k/v biases, else llama)")
  p_exp.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  p_comp = add("compile", help="compile the train step (or generate's decode step) ahead of time for a TPU slice or "
               "GPUs: does it fit, how fast at best")
  p_comp.add_argument("--config", required=True, help="preset file, e.g. configs/paper_7b.py")
  p_comp.add_argument("--topology", required=True, help="Cloud TPU accelerator type (v5p-128, v6e-64, v4-32, ...) "
                      "or GPUs (h100x8, h200x8, h200x16: hosts of 8; needs scripts/cuda_compile_env.sh)")
  p_comp.add_argument("--decode", action="store_true", help="compile generate's decode step (one token per row over "
                      "a KV cache) instead of the train step")
  p_comp.add_argument("--batch", type=int, default=1, help="--decode: rows decoded at once (default 1)")
  p_comp.add_argument("--context", type=int, help="--decode: tokens the KV cache holds (default: model.max_seq_len)")
  p_comp.add_argument("overrides", nargs="*", help="section.field=value overrides, as for train")
  p_scale = add("scaling", help="the scaling-law sweep and fit (method.md §6)")
  p_scale.add_argument("action", choices=["sweep", "fit"], help="sweep: train the grid's unfinished runs; fit: fit "
                       "the law to the finished ones, print S*, draw plots")
  p_scale.add_argument("--sweep", default="configs/scaling_sweep.py", help="sweep preset (defines `sweep`)")
  p_scale.add_argument("--plots", help="fit: write loss_vs_activated.png and loss_vs_sparsity.png into this folder")
  p_scale.add_argument("--json", help="fit: also write the runs and fitted constants as JSON to this file")
  p_scale.add_argument("--seed", type=int, help="fit: only the runs of this seed (default: every seed's runs)")
  args = parser.parse_args(argv)
  with warnings.catch_warnings():
    warnings.showwarning = _show_warning(args.command)
    return _run(args) if args.debug else _run_reporting_errors(args)


def _run(args) -> int:
  return {"train": _train, "generate": _generate, "eval": _eval, "lm-eval": _lm_eval, "export-hf": _export_hf,
          "compile": _compile, "scaling": _scaling}[args.command](args)


def _say(line: str) -> None:
  """One line to stderr in one write: print's separate newline lets another thread's output (a failed save's
  TensorStore teardown) land in the middle of it."""
  sys.stderr.write(line + "\n")
  sys.stderr.flush()


def _say_last(line: str) -> None:
  """One line to stderr as the process's last word: from here on what other threads write to stderr goes nowhere,
  so none of it lands in the middle of the line."""
  try:
    sys.stderr.flush()
  except OSError:
    pass
  real = os.dup(2)
  null = os.open(os.devnull, os.O_WRONLY)
  os.dup2(null, 2)
  os.close(null)
  os.write(real, (line + "\n").encode())
  os.close(real)


def _run_reporting_errors(args) -> int:
  """_run, with every failure the library can name printed as one line (exit 2 for bad input, 1 for a failed
  save) instead of a traceback."""
  try:
    return _run(args)
  except (ValueError, FileNotFoundError, FileExistsError) as err:
    _say(f"qsparse {args.command}: error: {err}")
    return 2
  except OSError as err:  # a full disk during a save (CheckpointSaveError says which checkpoint is intact)
    # The failed save's abandoned asyncio tasks may still be printing tracebacks from their own threads, a piece at
    # a time, and would log more while the interpreter shuts down. Everything of ours is closed: silence their
    # stderr, say what failed on the real one, and leave without that teardown.
    sys.stdout.flush()
    _say_last(f"qsparse {args.command}: error: {err}")
    os._exit(1)
  except KeyboardInterrupt:
    _say(f"qsparse {args.command}: interrupted; the last checkpoint is kept")
    return 130


if __name__ == "__main__":
  sys.exit(main())
