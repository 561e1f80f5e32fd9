"""Presets and command-line overrides: types, unknown names with suggestions, missing files."""

import pathlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qsparse_jax.config import apply_overrides, load_preset

TINY = pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.py"


def test_overrides_parse_each_type():
  cfg = apply_overrides(load_preset(TINY), [
      "train.steps=7", "train.learning_rate=1e-3", "model.sparsity_down=0.5", "model.block=(2, 4)",
      "model.num_kv_heads=None", "model.act_bits=8", "data.source=files", "data.paths=['a.txt', 'b.txt']",
      "model.activation=silu", "train.progress=False", "train.sample_prompt=hello world"])
  assert cfg.train.steps == 7 and cfg.train.learning_rate == 1e-3 and cfg.model.sparsity_down == 0.5
  assert cfg.model.block == (2, 4) and cfg.model.num_kv_heads is None and cfg.model.act_bits == 8
  assert cfg.data.paths == ("a.txt", "b.txt") and cfg.model.activation == "silu"
  assert cfg.train.progress is False and cfg.train.sample_prompt == "hello world"
  assert isinstance(apply_overrides(cfg, ["train.learning_rate=1"]).train.learning_rate, float)


@pytest.mark.parametrize("override, match", [
    ("train.step=5", r"unknown config field 'train.step'; did you mean train.steps\?"),
    ("modle.d_model=5", r"unknown config field 'modle.d_model'; did you mean model.d_model\?"),
    ("train.steps=many", r"train.steps='many' has the wrong type: expected <class 'int'>"),
    ("train.steps=2.5", r"train.steps='2.5' has the wrong type"),
    ("model.activation=gelu", r"model.activation='gelu' has the wrong type: expected Literal\['relu2', 'silu'\]"),
    ("model.sparsity_qkv=1.0", r"sparsity must be in \[0, 1\)"),
    ("train.steps", r"must look like section.field=value"),
    ("data.seq_len=1", r"data.seq_len must be at least 2"),
])
def test_bad_overrides_name_what_is_wrong(override, match):
  with pytest.raises(ValueError, match=match):
    apply_overrides(load_preset(TINY), [override])


def test_missing_preset_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_preset(tmp_path / "nope.py")


def test_shorthands_sparsity_everywhere_and_paths_alone():
  cfg = apply_overrides(load_preset(TINY), ["model.sparsity=0.5", "model.sparsity_down=0.6", "data.paths=a.txt, b/"])
  assert (cfg.model.sparsity_qkv, cfg.model.sparsity_out, cfg.model.sparsity_up, cfg.model.sparsity_down) == (
      0.5, 0.5, 0.5, 0.6)  # the site's own override wins, in either order
  assert cfg.data.source == "files" and cfg.data.paths == ("a.txt", "b/")
  with pytest.raises(ValueError, match=r"model.sparsity='lots' has the wrong type"):
    apply_overrides(load_preset(TINY), ["model.sparsity=lots"])


def test_config_checks_across_sections():
  with pytest.raises(ValueError, match=r"data.seq_len=512 is longer than model.max_seq_len=128"):
    apply_overrides(load_preset(TINY), ["data.seq_len=512"])
  with pytest.raises(ValueError, match=r"data.paths is read only with data.source='files'"):
    apply_overrides(load_preset(TINY), ["data.paths=a.txt", "data.source=tfds"])


FIELDS = sorted({f"{section}.{field}" for section, fields in {
    "model": ["d_model", "num_layers", "sparsity", "sparsity_qkv", "block", "act_bits", "num_kv_heads", "dtype",
              "activation", "kernels", "rope_scaling"],
    "data": ["paths", "source", "seq_len", "validation_fraction", "tokenizer", "format"],
    "train": ["steps", "learning_rate", "decay", "sample_prompt", "progress", "init_from"],
    "mesh": ["data", "fsdp", "tensor"]}.items() for field in fields})
VALUES = ["0", "1", "-1", "0.5", "1e9", "None", "True", "(2, 4)", "[1, 2]", "'x'", "a,b", "", "nan", "[[[[",
          "((((" * 50, "{1: 2}", "b'x'", "1j", "🙂", "=", "\x00"]


@given(st.lists(st.one_of(
    st.tuples(st.sampled_from(FIELDS + ["model.", ".x", "x", "model.nope"]), st.sampled_from(VALUES))
    .map(lambda kv: f"{kv[0]}={kv[1]}"),
    st.text(max_size=30)), max_size=4))
@settings(max_examples=300, deadline=None)
def test_random_overrides_give_a_config_or_one_value_error(overrides):
  """What the CLI turns into one error line (ValueError) or a valid Config: never another exception."""
  try:
    cfg = apply_overrides(load_preset(TINY), overrides)
  except ValueError as err:
    assert str(err) and "\n" not in str(err).strip()
  else:
    assert cfg.model.sparsity_qkv < 1 and cfg.data.seq_len <= cfg.model.max_seq_len
