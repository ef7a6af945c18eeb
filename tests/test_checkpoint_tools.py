"""experiments/evaluate.py, sample.py and export.py on a finished small run (issue 15, item 3).

evaluate.py at the final step must reproduce summary.json's generation metrics and the
last validation row of metrics.jsonl; bad input is refused with one line.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from stabjax import workdir as workdir_lib
from stabjax.data.tokenizer import pseudo_word

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = ["--model=gpt2_nano", "--steps=4", "--batch_size=8", "--seq_len=32", "--eval_every=4",
       "--eval_batches=2", "--checkpoint_every=2", "--progress=false", "--num_samples=8",
       "--max_new_tokens=8", "--eval_gen_prompts=0", "--dtu_keep=8"]


def launcher(name, *args, timeout=400):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  return subprocess.run([sys.executable, os.path.join(REPO, "experiments", name), *args],
                        capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  wd = tmp_path_factory.mktemp("tools") / "run"
  proc = launcher("main.py", f"--workdir={wd}", *RUN)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return wd


def _same(a, b, path=""):
  """Equal nested metric dicts (NaN equals NaN)."""
  if isinstance(a, dict):
    assert set(a) == set(b), path
    for k in a:
      _same(a[k], b[k], f"{path}/{k}")
  elif isinstance(a, float) and math.isnan(a):
    assert isinstance(b, float) and math.isnan(b), path
  else:
    assert a == b, (path, a, b)


def test_evaluate_at_the_final_step_reproduces_the_summary(run_dir):
  proc = launcher("evaluate.py", f"--workdir={run_dir}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "| metric | value |" in proc.stdout and "greedy/hf_proportion" in proc.stdout
  got = json.loads((run_dir / "eval_step4.json").read_text())
  summary = json.loads((run_dir / "summary.json").read_text())
  assert got["step"] == 4
  assert set(got["generation"]) == {"sample", "greedy", "top_k", "nucleus", "synthetic"}
  _same(got["generation"], summary["generation"])
  rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
  val = [r for r in rows if "val_loss" in r and r["step"] == 4][-1]
  for k in ("val_loss", "val_ppl", "val_entropy"):
    np.testing.assert_allclose(got["validation"][k], val[k], rtol=1e-6)
  # The same generations, word for word.
  assert (run_dir / "eval_step4_samples.txt").read_text() == (run_dir / "samples.txt").read_text()


@pytest.mark.slow
def test_evaluate_an_earlier_step(run_dir):
  proc = launcher("evaluate.py", f"--workdir={run_dir}", "--step=2")
  assert proc.returncode == 0, proc.stderr[-2000:]
  early = json.loads((run_dir / "eval_step2.json").read_text())
  final = json.loads((run_dir / "summary.json").read_text())
  assert early["step"] == 2
  # Another checkpoint: the params moved in between.
  assert abs(early["validation"]["val_loss"] - final["final"]["val_loss"]) > 1e-6


def test_sample_prints_continuations_in_the_run_vocabulary(run_dir):
  prompt = f"{pseudo_word(0)} {pseudo_word(1)}"
  proc = launcher("sample.py", f"--workdir={run_dir}", f"--prompt={prompt}",
                  "--decoder=nucleus", "--num=3", "--max_new_tokens=6", "--seed=1")
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = [line for line in proc.stdout.splitlines() if line.startswith("[")]
  assert [line[:3] for line in lines] == ["[0]", "[1]", "[2]"]
  cfg = workdir_lib.load_config(str(run_dir))
  words = set(workdir_lib.run_tokenizer(cfg).words)
  for line in lines:
    head, cont = line.split(" ‖ ")
    assert head.endswith(prompt)
    assert len(cont.split()) <= 6 and set(cont.split()) <= words


def test_export_of_a_synthetic_run_loads_in_transformers(run_dir, tmp_path):
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  out = tmp_path / "hf"
  proc = launcher("export.py", f"--workdir={run_dir}", f"--out={out}", "--step=2")
  assert proc.returncode == 0, proc.stderr[-2000:]
  record = json.loads((out / "stabjax_export.json").read_text())
  assert record["step"] == 2 and record["dmu_folded"] and record["tokenizer"].startswith("none")
  model = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
  ids = np.random.RandomState(0).randint(4, 100, (2, 20))
  with torch.no_grad():
    got = model(torch.tensor(ids)).logits.numpy()
  cfg = workdir_lib.load_config(str(run_dir))
  _, trainer, params = workdir_lib.restore_params(str(run_dir), cfg,
                                                  workdir_lib.run_tokenizer(cfg), step=2)
  want = np.asarray(trainer.model.apply({"params": params}, jnp.asarray(ids),
                                        deterministic=True))
  assert np.abs(got - want).max() < 1e-4
  # --out must be new: nothing is overwritten.
  proc = launcher("export.py", f"--workdir={run_dir}", f"--out={out}", timeout=120)
  assert proc.returncode != 0 and "not an empty directory" in proc.stderr


@pytest.mark.parametrize("tool,case", [
    ("evaluate.py", "no_workdir"), ("sample.py", "no_checkpoint"), ("sample.py", "bad_step"),
    pytest.param("export.py", "bad_step", marks=pytest.mark.slow), ("sample.py", "bad_decoder")])
def test_bad_input_is_one_line(run_dir, tmp_path, tool, case):
  wd, args, expect = str(run_dir), [], None
  if case == "no_workdir":
    wd, expect = str(tmp_path / "nothing"), "no such workdir"
  elif case == "no_checkpoint":
    (tmp_path / "empty").mkdir()
    shutil.copy(run_dir / "config.json", tmp_path / "empty")
    wd, expect = str(tmp_path / "empty"), "has no checkpoint"
  elif case == "bad_step":
    args, expect = ["--step=3"], "no checkpoint of step 3; available steps: 2, 4"
  else:
    args, expect = ["--decoder=beam"], "accepted: sample, greedy, top_k, nucleus"
  if tool == "export.py":
    args.append(f"--out={tmp_path / 'out'}")
  before = sorted(os.listdir(run_dir))
  proc = launcher(tool, f"--workdir={wd}", *args, timeout=120)
  assert proc.returncode != 0
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], proc.stderr
  assert sorted(os.listdir(run_dir)) == before
  assert not (tmp_path / "out").exists()
