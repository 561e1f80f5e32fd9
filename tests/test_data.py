"""TFDS builder from local text, the Grain pipeline (packing, sharding, resumable state) and tokenizers."""

import numpy as np
import pytest

from qsparse_jax.data.text import lm_batches, split_text, text_source
from qsparse_jax.data.tokenizers import ByteTokenizer, make_tokenizer
from qsparse_jax.config import DataConfig


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpus")
  rng = np.random.default_rng(0)
  words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
  texts = {}
  for i in range(3):
    lines = [" ".join(rng.choice(words, 6)) + f" {i}-{n}" for n in range(400)]
    texts[f"doc{i}.txt"] = "\n".join(lines) + "\n"
    (root / f"doc{i}.txt").write_text(texts[f"doc{i}.txt"])
  return root, texts


def sources(root, tmp_path, chunk=None):
  cfg = DataConfig(source="files", paths=(str(root),), data_dir=str(tmp_path), validation_fraction=0.1)
  return text_source(cfg, "train"), text_source(cfg, "validation")


def test_split_text_cuts_at_a_line_boundary():
  text = "one\ntwo\nthree\nfour\n"
  train, val = split_text(text, 0.3)
  assert train + val == text and train.endswith("\n") and val == "four\n"


def test_builder_splits_every_file_into_train_and_validation(corpus, tmp_path):
  root, texts = corpus
  train, val = sources(root, tmp_path)
  train_text = "".join(r["text"].decode() for r in (train[i] for i in range(len(train))))
  val_text = "".join(r["text"].decode() for r in (val[i] for i in range(len(val))))
  for text in texts.values():  # each file's head is in train, its tail in validation, nothing lost or shared
    head, tail = split_text(text, 0.1)
    assert head in train_text and tail in val_text and tail not in train_text
  assert len(train_text) + len(val_text) == sum(map(len, texts.values()))


def packed_stream(source, tokenizer):
  """The concatenation of all documents (each followed by EOS), in source order: NumPy, independent of Grain."""
  return np.concatenate([np.asarray(tokenizer.encode(source[i]["text"].decode()) + [tokenizer.eos_id])
                         for i in range(len(source))])


def test_batches_are_consecutive_windows_of_the_packed_stream(corpus, tmp_path):
  root, _ = corpus
  train, _ = sources(root, tmp_path)
  tok = ByteTokenizer()
  batches = iter(lm_batches(train, tok, seq_len=63, batch_size=4, seed=0, shuffle=False, repeat=False))
  rows = np.concatenate([next(batches)["tokens"] for _ in range(5)])
  assert rows.shape == (20, 64) and rows.dtype == np.int32
  np.testing.assert_array_equal(rows.reshape(-1), packed_stream(train, tok)[: 20 * 64])


def test_iterator_state_resumes_exactly(corpus, tmp_path):
  root, _ = corpus
  train, _ = sources(root, tmp_path)
  ds = lm_batches(train, ByteTokenizer(), seq_len=31, batch_size=3, seed=7)
  it = iter(ds)
  for _ in range(4):
    next(it)
  state = it.get_state()
  expected = [next(it)["tokens"] for _ in range(3)]
  resumed = iter(ds)
  resumed.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(resumed)["tokens"], want)


def test_process_shards_read_their_own_documents(corpus, tmp_path):
  root, _ = corpus
  train, _ = sources(root, tmp_path)
  tok = ByteTokenizer()
  for index in range(2):
    ds = lm_batches(train, tok, seq_len=15, batch_size=1, seed=0, shuffle=False, repeat=False,
                         process_index=index, process_count=2)
    stream = np.concatenate([b["tokens"].reshape(-1) for b in ds])
    own = np.concatenate([packed_stream([train[i] for i in range(index, len(train), 2)], tok)])
    # The last row is zero-padded when a finite stream runs out; everything before it is this shard's documents.
    assert len(own) <= len(stream) < len(own) + 16
    np.testing.assert_array_equal(stream[: len(own)], own)
    assert not stream[len(own):].any()


def test_byte_tokenizer_round_trip():
  tok = ByteTokenizer()
  text = "def f(x):\n    return 'é' * x\n"
  assert tok.decode(tok.encode(text)) == text and max(tok.encode(text)) < 256


@pytest.mark.parametrize("cfg, error, match", [
    (lambda d: DataConfig(source="files", paths=(f"{d}/missing.txt",), data_dir=str(d)), FileNotFoundError,
     "missing.txt' does not exist"),
    (lambda d: DataConfig(source="files", paths=(f"{d}/empty",), data_dir=str(d)), FileNotFoundError,
     "holds no files"),
    (lambda d: DataConfig(source="files", paths=(f"{d}/blank.txt",), data_dir=str(d)), ValueError,
     "holds no text"),
])
def test_bad_data_paths(tmp_path, cfg, error, match):
  (tmp_path / "empty").mkdir()
  (tmp_path / "blank.txt").write_text("")
  with pytest.raises(error, match=match):
    text_source(cfg(tmp_path), "train")


def test_bad_tokenizer_spec(tmp_path):
  with pytest.raises(FileNotFoundError, match="tokenizer file"):
    make_tokenizer(f"sentencepiece:{tmp_path}/none.model")
  with pytest.raises(ValueError, match="data.tokenizer must be"):
    make_tokenizer("wordpiece")


def _train_tokenizer_files(tmp_path, text):
  """A real SentencePiece model and a real Hugging Face BPE tokenizer.json, trained here on `text`."""
  import sentencepiece as spm
  import tokenizers

  corpus = tmp_path / "tok_corpus.txt"
  corpus.write_text(text)
  spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=60,
                                 model_type="bpe", minloglevel=2)
  bpe = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
  bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel()
  bpe.decoder = tokenizers.decoders.ByteLevel()
  bpe.train([str(corpus)], tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"],
                                                          initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
  bpe.save(str(tmp_path / "tokenizer.json"))
  return f"sentencepiece:{tmp_path / 'sp.model'}", f"hf:{tmp_path / 'tokenizer.json'}"


def test_sentencepiece_and_hf_tokenizers_feed_the_pipeline(corpus, tmp_path):
  root, texts = corpus
  train, _ = sources(root, tmp_path)
  for spec in _train_tokenizer_files(tmp_path, texts["doc0.txt"]):
    tok = make_tokenizer(spec)
    line = "alpha beta gamma 0-1"
    assert tok.decode(tok.encode(line)).strip() == line
    assert tok.vocab_size < 400 and 0 <= tok.eos_id < tok.vocab_size
    batch = next(iter(lm_batches(train, tok, seq_len=20, batch_size=2, seed=0, shuffle=False)))["tokens"]
    np.testing.assert_array_equal(batch.reshape(-1), packed_stream(train, tok)[:42])
