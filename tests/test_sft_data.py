"""Instruction data for fine-tuning: JSONL -> TFDS, the standard library set, packing that does not cross examples,
the response-only loss, and a fine-tuning run through the training loop."""

import ast
import dataclasses
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qsparse_jax.data import chat, instructions
from qsparse_jax.config import Config, DataConfig, TrainConfig
from qsparse_jax.data.tokenizers import ByteTokenizer
from qsparse_jax.nn.model import ModelConfig, Transformer
from qsparse_jax.parallel.sharding import MeshConfig
from qsparse_jax.training.loop import train
from qsparse_jax.training.step import response_loss

WORDS = ["alpha", "beta", "gamma", "delta", "sum", "list", "sort", "value"]


def make_records(n, seed=0):
  """Instruction records in the formats chat.conversation reads, of varied lengths."""
  rng = np.random.default_rng(seed)
  records = []
  for i in range(n):
    question = " ".join(rng.choice(WORDS, 60 if i % 15 == 7 else rng.integers(1, 4)))  # a few long prompts
    answer = " ".join(rng.choice(WORDS, rng.integers(1, 40 if i % 10 == 0 else 6))) + f" #{i}"  # some are long
    kind = i % 3
    records.append({"prompt": question, "response": answer} if kind == 0 else
                   {"system_prompt": "Answer.", "question": question, "response": answer} if kind == 1 else
                   {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
  return records


@pytest.fixture(scope="module")
def jsonl_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("instructions")
  records = make_records(120)
  for part in range(2):  # two files, as a folder
    with open(root / f"part{part}.jsonl", "w") as f:
      f.write("\n".join(json.dumps(r) for r in records[part::2]) + "\n\n")
  return root, records


@pytest.fixture(scope="module")
def sources(jsonl_dir, tmp_path_factory):
  cfg = DataConfig(source="files", paths=(str(jsonl_dir[0]),), format="instructions", validation_fraction=0.2,
                   data_dir=str(tmp_path_factory.mktemp("tfds")))
  return instructions.instruction_source(cfg, "train"), instructions.instruction_source(cfg, "validation")


def stored(source):
  return [json.loads(source[i]["messages"]) for i in range(len(source))]


def test_jsonl_records_split_into_disjoint_train_and_validation(jsonl_dir, sources):
  _, records = jsonl_dir
  train, val = map(stored, sources)
  want = sorted(json.dumps(chat.conversation(r)) for r in records)
  assert sorted(json.dumps(m) for m in train + val) == want  # nothing lost, nothing shared
  assert 0.1 < len(val) / len(records) < 0.3  # hashed split near validation_fraction 0.2


def test_a_bad_jsonl_line_is_named(tmp_path):
  (tmp_path / "data.jsonl").write_text('{"prompt": "Q", "response": "A"}\n{"text": "no"}\n')
  cfg = DataConfig(source="files", paths=(str(tmp_path / "data.jsonl"),), format="instructions",
                   data_dir=str(tmp_path / "tfds"))
  with pytest.raises(chat.RecordError, match=r"data.jsonl:2: an instruction record has keys \['text'\]"):
    instructions.instruction_source(cfg, "train")
  (tmp_path / "data.jsonl").write_text('{"prompt": "Q", "response": "A"}\n{"prompt": \n')
  with pytest.raises(chat.RecordError, match=r"data.jsonl:2 is not valid JSON"):
    instructions.instruction_source(cfg, "train")
  assert not list((tmp_path / "tfds").rglob("*.array_record*"))  # nothing half-built is left to be reused


def split_rows(batch):
  """[(row, columns, tokens, loss_mask, positions)] of every conversation packed in a batch (NumPy)."""
  out = []
  for r in range(batch["tokens"].shape[0]):
    seg = batch["segment_ids"][r]
    for s in range(1, seg.max() + 1):
      at = np.flatnonzero(seg == s)
      assert np.all(np.diff(at) == 1), "a conversation's tokens are contiguous"
      out.append((r, at, batch["tokens"][r, at], batch["loss_mask"][r, at], batch["positions"][r, at]))
    assert np.all(batch["tokens"][r, seg == 0] == 0) and np.all(batch["loss_mask"][r, seg == 0] == 0)
  return out


def test_packing_keeps_each_conversation_whole_and_in_its_own_segment(sources):
  train, _ = sources
  tok, template = ByteTokenizer(), chat.TEMPLATES["chatml"]
  want = {}
  for messages in stored(train):
    ids, mask = chat.encode(messages, template, tok)
    if mask[:256].any():  # rows of 256 tokens: long ones are cut, those left without a response token dropped
      want[ids[:256].tobytes()] = (ids[:256], mask[:256])
  batches = list(instructions.sft_batches(train, tok, template, seq_len=255, batch_size=1, seed=0, shuffle=False,
                                      repeat=False))  # one row per batch: no partial batch is dropped
  assert all(b["tokens"].shape == (1, 256) and b["tokens"].dtype == np.int32 for b in batches)
  seen = []
  for batch in batches:
    for _, _, tokens, mask, positions in split_rows(batch):
      ids, want_mask = want[tokens.tobytes()]
      np.testing.assert_array_equal(mask, want_mask)
      np.testing.assert_array_equal(positions, np.arange(len(tokens)))
      seen.append(tokens.tobytes())
  assert sorted(seen) == sorted(want)  # every conversation once in one pass
  assert len(want) < len(stored(train)) and any(len(t) == 256 * 4 for t in seen)  # some were dropped, some cut
  assert max(b["segment_ids"].max() for b in batches) >= 2  # rows do hold several conversations
  assert max(b["segment_ids"].max() for b in batches) >= 2  # rows do hold several conversations


def test_iterator_state_resumes_exactly(sources):
  train, _ = sources
  ds = instructions.sft_batches(train, ByteTokenizer(), chat.TEMPLATES["plain"], seq_len=63, batch_size=2, seed=3)
  it = iter(ds)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  resumed = iter(ds)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


@pytest.fixture(scope="module")
def model_and_batch(sources):
  train, _ = sources
  cfg = ModelConfig(vocab_size=257, d_model=32, num_layers=2, num_heads=2, d_ff=64, max_seq_len=256,
                    activation="silu").with_sparsity(0.3)
  graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(1)))
  batch = next(iter(instructions.sft_batches(train, ByteTokenizer(), chat.TEMPLATES["chatml"], seq_len=255,
                                         batch_size=4, seed=0)))
  forward = jax.jit(lambda p, *args: nnx.merge(graphdef, p)(*map(jnp.asarray, args)))
  packed_logits = np.asarray(forward(params, batch["tokens"], batch["positions"], batch["segment_ids"]))
  return graphdef, params, batch, forward, packed_logits


def test_attention_does_not_cross_packed_conversations(model_and_batch):
  _, params, batch, forward, packed = model_and_batch
  conversations = split_rows(batch)
  assert any(at[0] > 0 for _, at, _, _, _ in conversations)  # some conversations start mid-row
  alone = np.zeros((len(conversations), batch["tokens"].shape[1]), np.int32)  # one per row, from position 0;
  for i, (_, _, tokens, _, _) in enumerate(conversations):                  # what follows it cannot be seen
    alone[i, :len(tokens)] = tokens
  alone_logits = np.asarray(forward(params, alone))
  for i, (row, at, tokens, _, _) in enumerate(conversations):
    # float32: the same sums over the same keys (masked keys add exact zeros); only the summation shapes differ
    np.testing.assert_allclose(packed[row, at], alone_logits[i, :len(tokens)], rtol=1e-5, atol=1e-5)


def test_response_loss_counts_response_tokens_of_the_same_conversation_only(model_and_batch):
  graphdef, params, batch, _, packed_logits = model_and_batch
  got = float(jax.jit(response_loss, static_argnums=0)(graphdef, params, jax.tree.map(jnp.asarray, batch)))
  logits = packed_logits[:, :-1].astype(np.float64)  # causal: the logits of [:, :-1] do not see the last column
  log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  targets, seg = batch["tokens"][:, 1:], batch["segment_ids"]
  nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
  counted = (batch["loss_mask"][:, 1:] == 1) & (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
  assert counted.sum() > 0
  assert got == pytest.approx(nll[counted].mean(), rel=1e-5)  # float32 logits, float64 reference


def test_standard_library_instructions_are_real_functions():
  records = list(itertools.islice(instructions.python_stdlib_instructions(), 300))  # the first modules' functions
  assert len(records) == 300
  for key, record in records:
    fn = ast.parse(record["response"]).body[0]
    assert isinstance(fn, ast.FunctionDef) and f"`{fn.name}`:" in record["prompt"]
    assert ast.get_docstring(fn) is None and len(record["response"]) <= 320


def sft_config(tmp_path, jsonl_root, **train_kwargs) -> Config:
  kwargs = dict(steps=6, batch_size=4, learning_rate=1e-2, end_learning_rate=1e-3, warmup_steps=1, eval_every=6,
                eval_batches=2, log_every=1, checkpoint_every=6, out_dir=str(tmp_path / "sft"), sample_tokens=0,
                progress=False)
  kwargs.update(train_kwargs)
  return Config(
      model=ModelConfig(vocab_size=257, d_model=32, num_layers=1, num_heads=2, d_ff=64, max_seq_len=128,
                        activation="silu").with_sparsity(0.3),
      data=DataConfig(source="files", paths=(str(jsonl_root),), format="instructions", validation_fraction=0.2,
                      data_dir=str(tmp_path / "tfds"), seq_len=127),
      train=TrainConfig(**kwargs),
      mesh=MeshConfig(data=2, fsdp=2, tensor=2))


def test_fine_tuning_through_the_loop(jsonl_dir, tmp_path, capsys):
  from qsparse_jax.training.optimizer import make_optimizer
  from qsparse_jax.training.step import init_train_state

  cfg = sft_config(tmp_path, jsonl_dir[0])
  logs = []
  final = train(cfg, log=logs.append)
  assert any("instructions (" in m and "chat template chatml" in m for m in logs)
  metrics = [json.loads(line) for line in open(tmp_path / "sft" / "metrics.jsonl")]
  loss = {m["step"]: m["loss"] for m in metrics if "loss" in m}
  # The first step's loss is the response loss of the initial weights on the first packed batch (computed here).
  dc = cfg.data
  first = next(iter(instructions.sft_batches(instructions.instruction_source(dc, "train"), ByteTokenizer(),
                                         chat.TEMPLATES["chatml"], seq_len=dc.seq_len, batch_size=4,
                                         seed=dc.shuffle_seed)))
  graphdef, state = init_train_state(cfg.model, make_optimizer(cfg.train), seed=cfg.train.seed)
  want = float(jax.jit(response_loss, static_argnums=0)(graphdef, state["params"], jax.tree.map(jnp.asarray, first)))
  assert loss[1] == pytest.approx(want, rel=1e-5)
  assert loss[6] < loss[1] - 0.5  # lr 1e-2 on a few hundred answer tokens: the response loss falls fast
  assert np.isfinite(final["val_loss"])
  # `qsparse generate --chat` asks in the run's template and stops at its end of turn.
  from qsparse_jax import cli, inference
  from qsparse_jax.inference import decode

  capsys.readouterr()
  assert cli.main(["generate", "--checkpoint", str(tmp_path / "sft"), "--chat", "--prompt", "sort alpha",
                   "--max-new-tokens", "5", "--temperature", "0"]) == 0
  loaded = inference.load(tmp_path / "sft")
  prompt = "<|im_start|>user\nsort alpha<|im_end|>\n<|im_start|>assistant\n"
  want = decode.generate(loaded.graphdef, loaded.params, loaded.config.model, [list(prompt.encode())],
                         decode.SamplingConfig(max_new_tokens=5, stop=("<|im_end|>",)), decode_text=ByteTokenizer().decode)
  text = ByteTokenizer().decode(want.tokens[0])
  # The CLI ends its output with one newline: the text's own, if it ends with one.
  assert capsys.readouterr().out == prompt + text + ("" if text.endswith("\n") else "\n")
  with pytest.raises(ValueError, match=r"the validation split \(\d+ conversations\) fills less than one batch of "
                                       r"64 rows of 128 tokens"):
    train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=64, out_dir=str(tmp_path / "b"))),
          log=lambda _: None)
