"""The lm-evaluation-harness model (inference.harness) and `qsparse lm-eval`, offline on tasks written here.

Every loglikelihood the harness gets is checked against the model's logits put through a NumPy log-softmax here;
every generation against decode.generate (what `qsparse generate --temperature 0` runs). The model is a small run
trained for real on a word corpus, restored from its Orbax checkpoint like any run.
"""

import dataclasses
import functools
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

pytest.importorskip("lm_eval")

from lm_eval import evaluator  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

from qsparse_jax import cli, hf, inference  # noqa: E402
from qsparse_jax.config import Config, DataConfig, TrainConfig  # noqa: E402
from qsparse_jax.inference import decode, harness  # noqa: E402
from qsparse_jax.nn.model import ModelConfig, Transformer  # noqa: E402
from qsparse_jax.parallel.sharding import MeshConfig, make_mesh  # noqa: E402
from qsparse_jax.training.checkpoint import Checkpointer, meta_json  # noqa: E402
from qsparse_jax.training.loop import train  # noqa: E402
from qsparse_jax.training.optimizer import make_optimizer  # noqa: E402

WORDS = ["all", "the", "world", "is", "a", "stage", "and", "men", "women", "merely", "players"]
MAX_LEN = 64


def one_device():
  return make_mesh(MeshConfig(), devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A Q-Sparse model (top-K 50% at every site, context 64 bytes) trained 60 steps on sentences of WORDS."""
  tmp = tmp_path_factory.mktemp("lm_eval_run")
  rng = np.random.default_rng(1)
  (tmp / "corpus.txt").write_text("\n".join(" ".join(rng.choice(WORDS, 8)) + "." for _ in range(800)))
  config = Config(
      model=ModelConfig(vocab_size=257, d_model=48, num_layers=2, num_heads=2, d_ff=96,
                        max_seq_len=MAX_LEN).with_sparsity(0.5),
      data=DataConfig(source="files", paths=(str(tmp / "corpus.txt"),), data_dir=str(tmp / "tfds"), seq_len=MAX_LEN),
      train=TrainConfig(steps=60, batch_size=8, learning_rate=1e-2, warmup_steps=5, eval_every=60, eval_batches=1,
                        checkpoint_every=60, out_dir=str(tmp / "run"), sample_tokens=0, progress=False))
  train(config, log=lambda _: None)
  return tmp / "run"


@pytest.fixture(scope="module")
def loaded(run_dir):
  return harness.load_model(str(run_dir), mesh=one_device())


@functools.lru_cache
def model_forward(graphdef):
  return jax.jit(lambda params, tokens: nnx.merge(graphdef, params)(tokens))


def reference_logprobs(loaded, sequences):
  """log p(token i | tokens before it), i >= 1, of each sequence (at most MAX_LEN + 1 tokens): the model's logits
  (one jitted call on a [1, MAX_LEN] row; a causal model's logits do not see the tokens after them) through a
  float64 NumPy log-softmax."""
  forward = model_forward(loaded.graphdef)
  out = []
  for seq in sequences:
    assert 2 <= len(seq) <= MAX_LEN + 1
    row = np.zeros((1, MAX_LEN), np.int32)
    row[0, :len(seq) - 1] = seq[:-1]
    logits = np.asarray(forward(loaded.params, jnp.asarray(row)), np.float64)[0, :len(seq) - 1]
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    targets = np.asarray(seq[1:])
    out.append((logp[np.arange(len(targets)), targets], logits.argmax(-1) == targets))
  return out


def reference_loglikelihood(loaded, context: str, continuation: str):
  """lm-eval's convention, computed directly: byte tokens, the context's trailing spaces moved to the continuation,
  an empty context replaced by the end-of-text token, the oldest tokens dropped beyond the model's window."""
  tok = loaded.tokenizer
  if context:
    spaces = len(context) - len(context.rstrip())
    context, continuation = context[:len(context) - spaces], context[len(context) - spaces:] + continuation
  ctx, cont = (tok.encode(context) if context else [tok.eos_id]), tok.encode(continuation)
  seq = (ctx + cont)[-(MAX_LEN + 1):]
  logp, greedy = reference_logprobs(loaded, [seq])[0]
  return float(logp[-len(cont):].sum()), bool(greedy[-len(cont):].all())


def write_task(folder, name, docs, **config):
  """A local lm-eval task: docs as JSONL, its YAML beside (dataset_path: json)."""
  (folder / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
  data_files = {"test": str(folder / f"{name}.jsonl")}
  task = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": data_files}, "test_split": "test",
          **config}
  (folder / f"{name}.yaml").write_text(yaml.safe_dump(task, sort_keys=False))


def run_task(lm, folder, name, **kwargs):
  results = evaluator.simple_evaluate(model=lm, tasks=[name], task_manager=harness.task_manager(str(folder), [name]),
                                     bootstrap_iters=0, **kwargs)
  return results["results"][name], results["samples"][name]


MC_DOCS = [
    {"context": "all the world is a ", "choices": ["stage.", "women", "players and men."], "label": 0},
    {"context": "and men ", "choices": ["merely", "is", "a stage"], "label": 0},
    {"context": "", "choices": ["all the", "xyz"], "label": 0},  # empty context: the end-of-text token stands in
    # 153 bytes of context: the model sees only its last 64 tokens minus the continuation's
    {"context": " ".join(WORDS * 3) + " world is", "choices": [" a stage.", " merely", " the"], "label": 0},
    # 70 bytes: context + continuation overflow the window too
  {"context": "the players ", "choices": ["and women merely players, all the world is a stage and all", "a"],
     "label": 1},
]
MC_CONFIG = dict(output_type="multiple_choice", doc_to_text="context", doc_to_choice="choices", doc_to_target="label",
                 target_delimiter="", metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True}])


def test_paper_task_set():
  specs = harness.parse_tasks("paper")
  assert [(s.name, s.num_fewshot) for s in specs] == [("arc_challenge", 25), ("hellaswag", 10), ("mmlu", 5),
                                                      ("winogrande", 5), ("truthfulqa_mc2", 0)]
  assert [s.num_fewshot for s in harness.parse_tasks("paper,lambada", num_fewshot=0)] == [0] * 6
  with pytest.raises(ValueError, match="names no task"):
    harness.parse_tasks(" , ")


def test_multiple_choice_loglikelihoods_are_the_models_log_probabilities(loaded, tmp_path):
  write_task(tmp_path, "qs_mc", MC_DOCS, **MC_CONFIG)
  lm = harness.QSparseLM(loaded, batch_size=4, mesh=one_device())
  result, samples = run_task(lm, tmp_path, "qs_mc")
  checked, truncated, correct = 0, 0, []
  for sample in sorted(samples, key=lambda s: s["doc_id"]):
    refs = []
    for (context, continuation), (got, greedy) in zip(sample["arguments"], sample["filtered_resps"]):
      want, want_greedy = reference_loglikelihood(loaded, context, continuation)
      np.testing.assert_allclose(got, want, rtol=1e-5)
      assert greedy == want_greedy
      refs.append(want)
      checked += 1
      truncated += len((context + continuation).encode()) > MAX_LEN + 1
    correct.append(int(np.argmax(refs)) == sample["target"])
  assert checked == sum(len(d["choices"]) for d in MC_DOCS) and truncated == 4
  assert result["acc,none"] == pytest.approx(np.mean(correct))
  assert correct[2]  # a trained model: it prefers its corpus's words to "xyz"
  # One request per model call, in another order: the same numbers.
  _, one_by_one = run_task(harness.QSparseLM(loaded, batch_size=1, mesh=one_device()), tmp_path, "qs_mc")
  for a, b in zip(sorted(samples, key=lambda s: s["doc_id"]), sorted(one_by_one, key=lambda s: s["doc_id"])):
    np.testing.assert_allclose([r[0] for r in a["filtered_resps"]], [r[0] for r in b["filtered_resps"]], rtol=1e-6)


def test_rolling_loglikelihood_predicts_every_token_once(loaded, tmp_path):
  short, long = "all the world is a stage.", " ".join(WORDS * 2)  # 25 and 107 bytes
  write_task(tmp_path, "qs_roll", [{"text": short}, {"text": long}], output_type="loglikelihood_rolling",
             doc_to_text="", doc_to_target="text",
             metric_list=[{"metric": "byte_perplexity"}])
  lm = harness.QSparseLM(loaded, batch_size=2, mesh=one_device())
  _, samples = run_task(lm, tmp_path, "qs_roll")
  got = {s["doc"]["text"]: s["filtered_resps"][0] for s in samples}
  eos, b_short, b_long = loaded.tokenizer.eos_id, list(short.encode()), list(long.encode())
  # The short text in one window after the end-of-text token. The long one in two: its first 64 bytes after the
  # end-of-text token, then the remaining 43, each with a full window of context (the 64 bytes before the last).
  rest = len(b_long) - MAX_LEN
  (whole, _), (first, _), (last, _) = reference_logprobs(loaded, [[eos] + b_short, [eos] + b_long[:MAX_LEN],
                                                                  b_long[-(MAX_LEN + 1):]])
  np.testing.assert_allclose(got[short], whole.sum(), rtol=1e-5)
  np.testing.assert_allclose(got[long], first.sum() + last[-rest:].sum(), rtol=1e-5)


def greedy_text(loaded, prompt_ids, n):
  g = decode.generate(loaded.graphdef, loaded.params, loaded.config.model, [prompt_ids],
                      decode.SamplingConfig(max_new_tokens=n, temperature=0.0))
  return loaded.tokenizer.decode(g.tokens[0])


def generate_requests(loaded, max_gen=24):
  """(Instances, the text each must return): prompts continued greedily by decode.generate for max_gen tokens, each
  cut at a stop string taken from the middle of its own continuation; one prompt longer than the model's window
  less max_gen (the harness keeps its last 40 tokens)."""
  tok = loaded.tokenizer
  prompts = ["all the world", "and women merely ", "a", " ".join(WORDS * 2) + " the"]
  requests, expected = [], []
  for i, prompt in enumerate(prompts):
    ids = tok.encode(prompt)[-(MAX_LEN - max_gen):]
    full = greedy_text(loaded, ids, max_gen)
    stop = full[6 + i:8 + i]
    requests.append(Instance("generate_until", {}, (prompt, {"until": [stop], "max_gen_toks": max_gen}), i))
    expected.append(full[:full.index(stop)])
    assert len(expected[-1]) < len(full) - 2  # the stop string ends the row early
  return requests, expected


def test_greedy_generation_is_decode_generate_stopped_at_the_stop_string(loaded, tmp_path):
  requests, expected = generate_requests(loaded)
  assert harness.QSparseLM(loaded, batch_size=4, mesh=one_device()).generate_until(requests) == expected
  assert harness.QSparseLM(loaded, batch_size=1, mesh=one_device()).generate_until(requests) == expected
  # Through simple_evaluate: a generation task whose targets are decode.generate's text cut at ".".
  tok = loaded.tokenizer
  docs = [{"prompt": p, "target": greedy_text(loaded, tok.encode(p), 24).split(".")[0]}
          for p in ("all the world is", "merely", "the stage and")]
  write_task(tmp_path, "qs_gen", docs, output_type="generate_until", doc_to_text="prompt", doc_to_target="target",
             generation_kwargs={"until": ["."], "max_gen_toks": 24, "do_sample": False},
             metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}])
  result, samples = run_task(harness.QSparseLM(loaded, batch_size=4, mesh=one_device()), tmp_path, "qs_gen")
  assert sorted(s["filtered_resps"][0] for s in samples) == sorted(d["target"] for d in docs)
  assert result["exact_match,none"] == 1.0


def test_on_a_mesh_equals_one_device(run_dir, loaded):
  mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  sharded = harness.QSparseLM(str(run_dir), batch_size=4, mesh=mesh)
  up = sharded.params["blocks"][0]["ffn"]["up_proj"]["kernel"][...]
  assert up.sharding.shard_shape(up.shape) == (24, 48)  # [48, 96] split over fsdp (embed) and tensor (mlp)
  single = harness.QSparseLM(loaded, batch_size=4, mesh=one_device())
  pairs = [(list(b"all the world "), list(b"is a stage.")), (list(b"and"), list(b" men merely")),
           (list(b"women"), list(b" merely players"))]
  np.testing.assert_allclose([r[0] for r in sharded.score_tokens(pairs)],
                             [r[0] for r in single.score_tokens(pairs)], rtol=1e-5)
  requests, expected = generate_requests(loaded)
  assert sharded.generate_until(requests[:3]) == expected[:3]  # the short prompts: one compiled shape


def test_dense_evaluation_of_a_sparse_model_runs_every_site_dense(loaded):
  lm = harness.QSparseLM(loaded, batch_size=4, mesh=one_device())
  dense = lm.dense()
  assert dense.cfg == dataclasses.replace(loaded.config.model.with_sparsity(0.0))
  dense_loaded = inference.with_model(loaded, dense.cfg)
  pairs = [("all the world", " is a stage."), ("and men", " merely players")]
  got_sparse = lm.score_tokens([(list(c.encode()), list(x.encode())) for c, x in pairs])
  got_dense = dense.score_tokens([(list(c.encode()), list(x.encode())) for c, x in pairs])
  for (c, x), s, d in zip(pairs, got_sparse, got_dense):
    np.testing.assert_allclose(d[0], reference_loglikelihood(dense_loaded, c, x)[0], rtol=1e-5)
    np.testing.assert_allclose(s[0], reference_loglikelihood(loaded, c, x)[0], rtol=1e-5)
    assert abs(s[0] - d[0]) > 1e-3  # top-K 50% changes the numbers


def test_compare_dense_of_a_model_with_sparsity_0_gives_equal_columns(run_dir, loaded, tmp_path, capsys):
  # The trained weights saved again as a run whose model has every sparsity 0 (a fresh optimizer state beside them).
  config = dataclasses.replace(loaded.config, model=loaded.config.model.with_sparsity(0.0))
  params = jax.device_get(loaded.params)
  state = {"step": jnp.asarray(7, jnp.int32), "params": params, "opt_state": make_optimizer(config.train).init(params)}
  checkpointer = Checkpointer(tmp_path / "dense_run" / "checkpoints")
  checkpointer.save(7, state, meta=meta_json(config), force=True)
  checkpointer.close()
  write_task(tmp_path, "qs_mc", MC_DOCS, **MC_CONFIG)
  out_json = tmp_path / "scores.json"
  code = cli.main(["lm-eval", "--checkpoint", str(tmp_path / "dense_run"), "--tasks", "qs_mc", "--include-path",
                   str(tmp_path), "--compare-dense", "--batch-size", "4", "--json", str(out_json)])
  assert code == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].startswith(f"{tmp_path / 'dense_run'} (step 7): kept entries per site qkv 48/48, out 48/48")
  row = next(line for line in lines if line.startswith("qs_mc"))
  acc = json.loads(out_json.read_text())
  (sparse_acc,), (dense_acc,) = acc["scores"], acc["dense"]
  assert sparse_acc == dense_acc and sparse_acc["samples"] == len(MC_DOCS)
  assert row.split() == ["qs_mc", "acc", "5", f"{sparse_acc['value']:.4f}", "±", f"{sparse_acc['stderr']:.4f}",
                         f"{dense_acc['value']:.4f}", "±", f"{dense_acc['stderr']:.4f}", "+0.0000"]
  assert lines[1].split()[:4] == ["task", "metric", "n", "dense"]


def test_hugging_face_checkpoint_with_a_sparsity_override(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  text = "\n".join(" ".join(np.random.default_rng(2).choice(WORDS, 8)) for _ in range(200))
  (tmp_path / "corpus.txt").write_text(text)
  bpe = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
  bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel()
  bpe.decoder = tokenizers.decoders.ByteLevel()
  alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
  bpe.train([str(tmp_path / "corpus.txt")], tokenizers.trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<unk>", "</s>"], initial_alphabet=alphabet))
  cfg = ModelConfig(vocab_size=300, d_model=32, num_layers=1, num_heads=2, d_ff=64, max_seq_len=MAX_LEN,
                    activation="silu")
  _, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(3)))
  hf.save_pretrained(tmp_path / "model", cfg, params)
  bpe.save(str(tmp_path / "model" / "tokenizer.json"))
  lm = harness.QSparseLM(f"hf:{tmp_path / 'model'}", sparsity=0.4, batch_size=2, mesh=one_device())
  assert (lm.cfg.sparsity_qkv, lm.cfg.sparsity_down) == (0.4, 0.4)
  want_cfg, want_params = hf.load_pretrained(tmp_path / "model", sparsity_qkv=0.4, sparsity_out=0.4, sparsity_up=0.4,
                                             sparsity_down=0.4)
  assert lm.cfg == want_cfg
  tok = lm.tok
  context, continuation = "all the world", " is a stage"
  whole, ctx = tok.encode(context + continuation), tok.encode(context)
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(want_cfg, rngs=nnx.Rngs(0))))
  ref = inference.LoadedModel(config=Config(model=want_cfg, data=DataConfig(seq_len=MAX_LEN)), graphdef=graphdef,
                              params=want_params, tokenizer=tok, step=0)
  logp, _ = reference_logprobs(ref, [whole])[0]
  (got, _), = lm.score_tokens([(ctx, whole[len(ctx):])])
  np.testing.assert_allclose(got, logp[len(ctx) - 1:].sum(), rtol=1e-5)


def test_a_task_whose_dataset_is_on_the_hub_fails_offline_with_one_line(run_dir, tmp_path):
  (tmp_path / "hub_task.yaml").write_text(textwrap.dedent("""
      task: qs_hub
      dataset_path: qsparse-tests/not-downloaded
      test_split: test
      output_type: multiple_choice
      doc_to_text: context
      doc_to_choice: choices
      doc_to_target: label
      """))
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
         "HF_DATASETS_CACHE": str(tmp_path / "hf_cache")}
  result = subprocess.run([sys.executable, "-m", "qsparse_jax.cli", "lm-eval", "--checkpoint", str(run_dir),
                           "--tasks", "qs_hub", "--include-path", str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=300)
  assert result.returncode == 1, result.stderr
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("qsparse lm-eval: error: a task's dataset cannot be downloaded")
  assert "qsparse-tests/not-downloaded" in lines[0]
