"""Presets and command-line overrides: types, unknown names with suggestions, missing files."""

import pathlib

import pytest

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
