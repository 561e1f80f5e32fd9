"""Faults injected into real `qsparse` processes and real Orbax files (docs/reliability.md).

A run killed with SIGKILL mid-step or mid-save, or whose newest checkpoint is truncated, overwritten or deleted,
resumes and ends with exactly the losses of a run that was never interrupted. A finished run run again touches no
file. Bad input ends in one line, legal but suspicious input in one warning line, and no traceback reaches the user.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

STEPS = 24  # checkpoints every 3 steps, the last 3 kept: 18, 21, 24 at the end


def write_preset(folder: pathlib.Path, run_dir: pathlib.Path, *, d_model: int = 32) -> pathlib.Path:
  corpus = folder / "corpus.txt"
  rng = np.random.default_rng(1)
  corpus.write_text("\n".join(" ".join(rng.choice(["all", "the", "world", "is", "a", "stage"], 7))
                              for _ in range(500)))
  preset = folder / "faults.py"
  preset.write_text(textwrap.dedent(f"""
      from qsparse_jax.config import Config, DataConfig, ModelConfig, TrainConfig
      config = Config(
          model=ModelConfig(vocab_size=257, d_model={d_model}, num_layers=2, num_heads=2, d_ff={2 * d_model})
          .with_sparsity(0.3),
          data=DataConfig(source="files", paths=({str(corpus)!r},), data_dir={str(folder / "tfds")!r}, seq_len=32),
          train=TrainConfig(steps={STEPS}, batch_size=4, warmup_steps=2, eval_every=3, eval_batches=1, log_every=1,
                            checkpoint_every=3, keep_checkpoints=3, out_dir={str(run_dir)!r}, sample_tokens=0,
                            progress=False))
      """))
  return preset


def qsparse(*args, **popen):
  """`python -m qsparse_jax.cli ARGS` in a new process (CPU only), as a user runs it."""
  command = [sys.executable, "-m", "qsparse_jax.cli", *map(str, args)]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  if popen:
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def curve(run_dir: pathlib.Path) -> list[tuple]:
  """Every logged loss, gradient norm and validation loss of a run, by step (tokens/s left out: a timing)."""
  rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
  return [(r["step"], r.get("loss"), r.get("grad_norm"), r.get("val_loss")) for r in rows]


def no_traceback(result) -> None:
  assert "Traceback" not in result.stderr, result.stderr


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run of STEPS steps: its preset and run directory."""
  folder = tmp_path_factory.mktemp("reference")
  preset = write_preset(folder, folder / "run")
  result = qsparse("train", "--config", preset)
  assert result.returncode == 0, result.stderr
  return preset, folder / "run"


def copy_run(reference, tmp_path, *, drop_steps=()) -> pathlib.Path:
  """A copy of the reference run as a run interrupted after its newest kept checkpoint would be: without the
  checkpoints in drop_steps and without final_metrics.json."""
  _, run_dir = reference
  copy = tmp_path / "run"
  shutil.copytree(run_dir, copy)
  for step in drop_steps:
    shutil.rmtree(copy / "checkpoints" / str(step))
  (copy / "final_metrics.json").unlink()
  return copy


def resume(reference, run_dir):
  preset, _ = reference
  return qsparse("train", "--config", preset, f"train.out_dir={run_dir}")


def kill_when(preset, run_dir: pathlib.Path, condition) -> None:
  """Start `qsparse train` and SIGKILL it the moment condition() holds (polled every half millisecond)."""
  process = qsparse("train", "--config", preset, f"train.out_dir={run_dir}", popen=True)
  while process.poll() is None and not condition():
    time.sleep(0.0005)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert process.returncode == -signal.SIGKILL, "the run ended before the fault could be injected"
  assert not (run_dir / "final_metrics.json").exists()


def saved_steps(run_dir: pathlib.Path) -> list[int]:
  folder = run_dir / "checkpoints"
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def resumes_on_the_reference_curve(reference, run_dir: pathlib.Path) -> None:
  """The same command again: it resumes from the newest finished checkpoint, with no traceback, and ends with the
  uninterrupted run's losses."""
  resumed_at = max(saved_steps(run_dir))
  result = resume(reference, run_dir)
  assert result.returncode == 0, result.stderr
  no_traceback(result)
  assert f"resumed from {run_dir / 'checkpoints'} at step {resumed_at}" in result.stdout
  assert curve(run_dir) == curve(reference[1])


def test_kill_mid_step_then_resume_equals_uninterrupted(reference, tmp_path):
  preset, _ = reference
  run_dir = tmp_path / "run"
  kill_when(preset, run_dir, lambda: 6 in saved_steps(run_dir))  # training goes on past step 6 meanwhile
  resumes_on_the_reference_curve(reference, run_dir)


def test_kill_mid_save_then_resume_equals_uninterrupted(reference, tmp_path):
  """SIGKILL while Orbax is writing a checkpoint (its temporary folder exists) after an earlier one finished: the
  resumed run ignores the partial save, resumes from the earlier checkpoint and ends with the uninterrupted losses."""
  preset, _ = reference
  run_dir = tmp_path / "run"
  checkpoints = run_dir / "checkpoints"

  def saving():
    partial = [p.name for p in checkpoints.glob("*.orbax-checkpoint-tmp*")] if checkpoints.is_dir() else []
    return bool(partial) and bool(saved_steps(run_dir)) and int(partial[0].split(".")[0]) > max(saved_steps(run_dir))

  kill_when(preset, run_dir, saving)
  assert list(checkpoints.glob("*.orbax-checkpoint-tmp*")), "the save was not cut off"
  resumes_on_the_reference_curve(reference, run_dir)


def _truncate(step_dir: pathlib.Path) -> str:
  data = max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
  return data.name


def _overwrite(step_dir: pathlib.Path) -> str:
  data = max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  content = bytearray(data.read_bytes())
  start = len(content) // 4
  content[start:start + min(100_000, len(content) // 2)] = np.random.default_rng(0).bytes(
      min(100_000, len(content) // 2))
  data.write_bytes(bytes(content))
  return "state"


def _delete_state(step_dir: pathlib.Path) -> str:
  shutil.rmtree(step_dir / "state")
  return "state"


def _garbage_meta(step_dir: pathlib.Path) -> str:
  (step_dir / "meta" / "metadata").write_text("{not json")
  return "metadata"


@pytest.mark.parametrize("damage", [_truncate, _overwrite, _delete_state, _garbage_meta],
                         ids=["truncated", "overwritten", "state-deleted", "meta-garbage"])
def test_damaged_newest_checkpoint_resumes_from_the_previous(reference, tmp_path, damage):
  run_dir = copy_run(reference, tmp_path, drop_steps=[24])  # newest kept: 21, then 18
  damage(run_dir / "checkpoints" / "21")
  result = resume(reference, run_dir)
  assert result.returncode == 0, result.stderr
  no_traceback(result)
  warnings = result.stderr.strip().splitlines()
  assert len(warnings) == 2, result.stderr
  assert warnings[0].startswith(f"qsparse train: warning: checkpoint {run_dir / 'checkpoints' / '21'}")
  assert warnings[0].endswith("; trying step 18")
  assert warnings[1] == (f"qsparse train: warning: checkpoint {run_dir / 'checkpoints' / '21'} moved to "
                         f"{run_dir / 'checkpoints' / '21.damaged'}")
  assert f"resumed from {run_dir / 'checkpoints'} at step 18" in result.stdout
  assert (run_dir / "checkpoints" / "21.damaged").is_dir()  # kept for inspection
  assert curve(run_dir) == curve(reference[1])


def test_generate_passes_over_a_damaged_checkpoint_unless_a_step_is_given(reference, tmp_path):
  run_dir = copy_run(reference, tmp_path, drop_steps=[24])
  _truncate(run_dir / "checkpoints" / "21")
  before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
  result = qsparse("generate", "--checkpoint", run_dir, "--prompt", "the", "--max-new-tokens", "4")
  assert result.returncode == 0, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 2 and lines[0].startswith("qsparse generate: warning: checkpoint") and "step 18" in lines[0]
  assert lines[1].endswith("checkpoint step 18)")
  assert result.stdout.startswith("the") and result.stdout.endswith("\n")  # the text ends its line
  exact = qsparse("eval", "--checkpoint", run_dir, "--step", "21", "--batches", "1")
  assert exact.returncode == 2
  assert exact.stderr.strip().splitlines() == [exact.stderr.strip()]  # one line
  assert exact.stderr.startswith(f"qsparse eval: error: checkpoint {run_dir / 'checkpoints' / '21'} cannot be "
                                 "restored: reading ")
  assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before  # nothing moved or deleted
  debug = qsparse("eval", "--checkpoint", run_dir, "--step", "21", "--batches", "1", "--debug")
  assert "Traceback" in debug.stderr and "CheckpointRestoreError" in debug.stderr


def test_a_run_whose_checkpoints_all_fail_stops_with_one_line(reference, tmp_path):
  run_dir = copy_run(reference, tmp_path)
  for step in (18, 21, 24):
    _garbage_meta(run_dir / "checkpoints" / str(step))
  result = resume(reference, run_dir)
  assert result.returncode == 2
  errors = [line for line in result.stderr.splitlines() if ": error: " in line]
  assert len(errors) == 1 and errors[0].startswith(
      f"qsparse train: error: no checkpoint in {run_dir / 'checkpoints'} can be restored (3 tried: step 24: ")
  no_traceback(result)
  assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["18", "21", "24"]  # nothing moved


def test_rerunning_a_finished_run_touches_no_file(reference, tmp_path):
  preset, reference_dir = reference
  run_dir = tmp_path / "run"
  shutil.copytree(reference_dir, run_dir)

  def snapshot():
    return {str(p.relative_to(run_dir)): (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else None
            for p in sorted(run_dir.rglob("*"))}

  before = snapshot()
  result = qsparse("train", "--config", preset, f"train.out_dir={run_dir}")
  assert result.returncode == 0, result.stderr
  final = json.loads((run_dir / "final_metrics.json").read_text())
  assert result.stdout.strip().splitlines() == [
      f"{run_dir} is complete: step {STEPS}, train loss {final['loss']:.4f}, validation loss "
      f"{final['val_loss']:.4f} nats/byte; raise train.steps to train it further"]
  assert snapshot() == before
  more = qsparse("train", "--config", preset, f"train.out_dir={run_dir}", f"train.steps={STEPS + 3}")
  assert more.returncode == 0, more.stderr
  assert f"resumed from {run_dir / 'checkpoints'} at step {STEPS}" in more.stdout
  assert json.loads((run_dir / "final_metrics.json").read_text())["step"] == STEPS + 3


def one_line_error(result, command="train"):
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"qsparse {command}: error: "), \
      result.stderr
  return lines[0][len(f"qsparse {command}: error: "):]


def test_bad_inputs_are_one_line_and_leave_nothing_behind(reference, tmp_path):
  preset, _ = reference
  out = f"train.out_dir={tmp_path / 'never'}"
  assert one_line_error(qsparse("train", "--config", preset, out, "data.seq_len=4096")) == (
      "data.seq_len=4096 is longer than model.max_seq_len=256: lower data.seq_len or raise model.max_seq_len")
  assert one_line_error(qsparse("train", "--config", preset, out, "data.source=python_stdlib")).startswith(
      "data.paths is read only with data.source='files', and this config has data.source='python_stdlib'")
  tiny = tmp_path / "tiny.txt"
  tiny.write_text("one line")
  cache = tmp_path / "cache"
  message = one_line_error(qsparse("train", "--config", preset, out, f"data.paths={tiny}",
                                   f"data.data_dir={cache}"))
  assert message == ("data.paths: the corpus (1 file(s), 8 bytes) leaves no text for its validation split at "
                     "data.validation_fraction=0.05: give more text")
  assert not any(p.is_file() for p in cache.rglob("*")), sorted(cache.rglob("*"))  # no half-built dataset
  assert not (tmp_path / "never").exists()
  prompt_first = qsparse("generate", "--checkpoint", reference[1], "--prompt", "The", "--max-new-tokens", "1000")
  assert one_line_error(prompt_first, "generate").startswith("a prompt of 3 tokens plus 1000 new ones exceeds")
  assert prompt_first.stdout == ""  # nothing shown before the request was checked


def test_suspicious_inputs_warn_in_one_line(reference, tmp_path):
  preset, _ = reference
  binary = tmp_path / "program"
  shutil.copy(sys.executable, binary)  # an ELF executable as the corpus
  latin = tmp_path / "latin1.txt"
  latin.write_bytes("café naïve résumé\n".encode("latin-1") * 300)
  common = [f"data.data_dir={tmp_path / 'cache'}", "train.steps=1", "train.eval_every=1"]
  result = qsparse("train", "--config", preset, f"train.out_dir={tmp_path / 'a'}", f"data.paths={binary},{latin}",
                   "model.sparsity_qkv=0.999", *common)
  assert result.returncode == 0, result.stderr
  assert "Downloading and preparing" not in result.stdout  # TFDS's banner, meaningless for local files
  assert result.stderr.strip().splitlines() == [
      "qsparse train: warning: model.sparsity_qkv=0.999 keeps K = 0 of the 32 entries at the qkv site: its "
      "projections see only zeros",
      f"qsparse train: warning: data.paths: {latin} is not UTF-8 (byte 3 is 0xe9); 1200 characters became U+FFFD: "
      "convert it first, e.g. iconv -f latin1 -t utf-8",
      f"qsparse train: warning: data.paths: {binary} holds NUL bytes: it looks binary, not text (training on it "
      "anyway)"]
  resumed = qsparse("train", "--config", preset, f"train.out_dir={tmp_path / 'a'}", f"data.paths={latin}",
                    "model.sparsity_qkv=0.999", *common[:1], "train.steps=2", "train.eval_every=1")
  assert resumed.returncode == 0, resumed.stderr
  assert resumed.stderr.strip().splitlines()[-1] == (
      f"qsparse train: warning: the data changed since the checkpoint in {tmp_path / 'a'} (data.paths was "
      f"[{str(binary)!r}, {str(latin)!r}], now [{str(latin)!r}]): the data stream starts from its beginning")


def test_abandoned_read_reports_are_dropped_on_every_path_and_nothing_else_is():
  # What a failed restore's other reads print from their own threads, by each route Python has for it, beside
  # failures of other kinds that must still be shown.
  script = textwrap.dedent("""
      import asyncio, logging, sys, threading
      from qsparse_jax.training.checkpoint import _silence_abandoned_reads
      _silence_abandoned_reads()
      def fail(message):
        raise RuntimeError(message)
      for message in ("Event loop is closed", "kept: thread"):
        thread = threading.Thread(target=fail, args=(message,)); thread.start(); thread.join()
      class Dropped:  # an exception in __del__ goes to sys.unraisablehook
        def __init__(self, message):
          self.message = message
        def __del__(self):
          fail(self.message)
      for message in ("Encountered error while reading array index 3", "kept: unraisable"):
        Dropped(message)
      logging.basicConfig()
      for message in ("Event loop is closed", "kept: logged"):
        try:
          fail(message)
        except RuntimeError:
          logging.getLogger("asyncio").exception("Exception in callback")
      fail("kept: main")
      """)
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
  assert result.returncode == 1
  assert "Event loop is closed" not in result.stderr and "array index" not in result.stderr, result.stderr
  for kept in ("thread", "unraisable", "logged", "main"):
    assert f"RuntimeError: kept: {kept}" in result.stderr, result.stderr
