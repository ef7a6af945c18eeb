"""experiments/main.py end to end: training, bad flags, resume after SIGKILL, SIGTERM, NaN."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from stabjax import compile_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(REPO, "experiments", "main.py")
# Small and quick; every run in this file shares these unless it overrides them.
FAST = ["--steps=30", "--batch_size=8", "--seq_len=32", "--eval_every=15", "--eval_batches=2",
        "--log_every=5", "--checkpoint_every=10", "--progress=false", "--vocab_size=320",
        "--num_samples=8"]


def main_cmd(workdir, *args, cache=None):
  cache = cache or os.path.join(os.path.dirname(str(workdir)), "cache")
  return [sys.executable, MAIN, f"--workdir={workdir}", f"--cache_dir={cache}", *FAST, *args]


def run_main(workdir, *args, timeout=300, cache=None, env=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu", **(env or {}))
  return subprocess.run(main_cmd(workdir, *args, cache=cache), capture_output=True, text=True,
                        timeout=timeout, env=env)


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r["nll"] for r in map(json.loads, f) if "nll" in r]


def summary(workdir):
  """summary.json without what differs between identical runs: the workdir and wall-clock
  throughput ('perf/...')."""
  with open(os.path.join(workdir, "summary.json")) as f:
    s = json.load(f)
  s.pop("workdir")
  timeless = lambda row: {k: v for k, v in row.items() if not k.startswith("perf/")}  # noqa: E731
  s["history"] = [timeless(r) for r in s["history"]]
  s["final"] = timeless(s["final"])
  return s


def test_default_gpt2_run_learns_and_writes_its_workdir(tmp_path):
  wd = tmp_path / "run"
  proc = run_main(wd)
  assert proc.returncode == 0, proc.stderr[-2000:]
  ls = losses(wd)
  assert ls[-1] < ls[0] - 0.3, ls
  for name in ("config.json", "metrics.jsonl", "summary.json"):
    assert (wd / name).exists()
  assert os.listdir(wd / "tb")
  assert str(wd) in proc.stdout
  s = summary(wd)
  assert s["status"] == "finished" and s["step"] == 30
  assert np.isfinite(s["final"]["val_ppl"])
  # Every decoder measured from the same prompts; the synthetic language's held-out text
  # is English-like in its top-20 share; the PSU's schedule is summarised.
  for decoder in ("sample", "greedy", "top_k", "nucleus"):
    hf = s["generation"][decoder]["hf_proportion"]  # nan: the decoder produced no word
    assert np.isnan(hf) or 0.0 <= hf <= 1.0, decoder
  assert 0.0 <= s["generation"]["sample"]["hf_proportion"] <= 1.0
  assert 0.20 <= s["generation"]["sample"]["hf_proportion_reference"] <= 0.35
  rows = [json.loads(line) for line in open(wd / "metrics.jsonl")]
  mult = [r["psu/multiplier"] for r in rows if "psu/multiplier" in r]
  assert len(mult) == 30 // 5
  np.testing.assert_allclose(s["psu"]["multiplier_mean"], np.mean(mult), rtol=1e-6)
  assert 0.0 < s["psu"]["multiplier_mean"] <= 2.0


def test_bert_tiny_trains_with_mlm_loss(tmp_path):
  wd = tmp_path / "bert"
  proc = run_main(wd, "--model=bert_tiny", "--steps=40", "--lr=1e-2")
  assert proc.returncode == 0, proc.stderr[-2000:]
  cfg = json.load(open(wd / "config.json"))
  assert cfg["model"]["arch"] == "bert"
  ls = losses(wd)
  assert ls[-1] < ls[0] - 0.3, ls


def test_a_run_from_the_compilation_cache_trains_bit_for_bit_like_a_compiled_one(tmp_path):
  """The second run loads its steps from the persistent cache the first one filled; a
  wrong or stale executable would change the losses."""
  cache = tmp_path / "jax_cache"
  small = (f"--compilation_cache_dir={cache}", "--steps=20", "--decoders=sample,greedy",
           "--num_samples=4")
  # Every program cached, however fast it compiled: with the default 0.5 s threshold a
  # program compiled in 0.4 s by the first run and 0.6 s by the second is new in the second.
  every = {compile_cache.MIN_COMPILE_ENV: "0"}
  first = run_main(tmp_path / "a", *small, env=every)
  assert first.returncode == 0, first.stderr[-2000:]
  filled = set(os.listdir(cache))
  assert filled, "the first run cached nothing"
  second = run_main(tmp_path / "b", *small, env=every)
  assert second.returncode == 0, second.stderr[-2000:]
  assert losses(tmp_path / "b") == losses(tmp_path / "a")
  assert summary(tmp_path / "b")["generation"] == summary(tmp_path / "a")["generation"]
  # Every executable the second run needed was there already.
  assert set(os.listdir(cache)) == filled


def test_trains_on_a_local_text_file(tmp_path):
  rng = np.random.default_rng(0)
  words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "home"]
  paras = [" ".join(rng.choice(words, 30)).capitalize() + "." for _ in range(200)]
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n\n".join(paras), encoding="utf-8")
  wd = tmp_path / "text"
  proc = run_main(wd, f"--data=text:{corpus}", "--steps=40", "--psu=false")
  assert proc.returncode == 0, proc.stderr[-2000:]
  cfg = json.load(open(wd / "config.json"))
  assert cfg["model"]["vocab_size"] == 320
  ls = losses(wd)
  assert ls[-1] < ls[0] - 0.5, ls


BAD_FLAGS = [
    ("--model=gpt5", "--model"),
    ("--alpha=-0.1", "--alpha"),
    ("--c_tilde=0", "--c_tilde"),
    ("--c_tilde=1.5", "--c_tilde"),
    ("--dtu_keep=0", "--dtu_keep"),
    ("--dmu_mode=dense", "--dmu_mode"),
    ("--mesh=data=2,fsdp", "--mesh"),
    ("--mesh=data=3", "--mesh"),
    ("--data=ftp:x", "data"),
    ("--data=text:/nonexistent/file.txt", "/nonexistent/file.txt"),
    ("--seq_len=1", "seq_len"),
    ("--optimizer=adam", "--optimizer"),
    ("--psu_grad_max_decay=0", "grad_max_decay"),
    ("--psu_c_tilde_from=half", "--psu_c_tilde_from"),
    ("--dtu_attention=flash", "--dtu_attention"),
    ("--seed=-1", "--seed"),
    ("--dtu_attention=cudnn", "--dtu_attention=cudnn"),  # no GPU here
]


@pytest.mark.parametrize("flag,named", BAD_FLAGS)
def test_bad_flag_is_one_line_and_writes_nothing(tmp_path, flag, named):
  wd = tmp_path / "wd"
  proc = run_main(wd, flag, timeout=120)
  assert proc.returncode != 0
  lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
  assert len(lines) == 1, proc.stderr
  assert "Traceback" not in proc.stderr and named in lines[0]
  assert not wd.exists()


def test_batch_not_divisible_by_data_parallel_devices(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  wd = tmp_path / "wd"
  proc = subprocess.run(main_cmd(wd, "--batch_size=6", "--mesh=data=4,fsdp=1,tensor=1"),
                        capture_output=True, text=True, timeout=120, env=env)
  assert proc.returncode != 0
  assert proc.stderr.strip().count("\n") == 0 and "--batch_size=6" in proc.stderr
  assert not wd.exists()


def _wait_for_checkpoint(proc, ckpt_dir, step, timeout=240):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if os.path.isdir(os.path.join(ckpt_dir, str(step))):
      return
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    time.sleep(0.2)
  raise TimeoutError(f"no checkpoint {step} in {ckpt_dir}")


# Slow: exact resume is also tested by default in test_workdir (resume past corrupt
# checkpoints equals the uninterrupted summary) and test_multiprocess.
@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_summary(tmp_path):
  ref, wd = tmp_path / "ref", tmp_path / "killed"
  assert run_main(ref).returncode == 0
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.Popen(main_cmd(wd), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, env=env)
  _wait_for_checkpoint(proc, wd / "checkpoints", 10)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (wd / "summary.json").exists()
  resumed = run_main(wd)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert summary(wd) == summary(ref)


# Slow: test_workdir's killed-lock test also ends a run with SIGTERM and checks exit 0.
@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_zero(tmp_path):
  wd = tmp_path / "term"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.Popen(main_cmd(wd, "--steps=100000", "--checkpoint_every=10"),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
  _wait_for_checkpoint(proc, wd / "checkpoints", 10)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-2000:]
  assert "preempted" in out
  steps = sorted(int(s) for s in os.listdir(wd / "checkpoints") if s.isdigit())
  assert steps and steps[-1] >= 10
  assert not (wd / "summary.json").exists()


def test_non_finite_loss_stops_and_the_last_checkpoint_restores(tmp_path):
  wd = tmp_path / "nan"
  proc = run_main(wd, "--lr=1e38", "--warmup_steps=1", "--checkpoint_every=1", "--psu=false",
                  "--clip_norm=1e30", "--steps=50")
  assert proc.returncode == 1
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "non-finite" in lines[0], proc.stderr
  assert not (wd / "summary.json").exists()
  # The newest checkpoint on disk restores and is finite.
  import jax
  from stabjax.checkpoint import Checkpointer
  ckpt = Checkpointer(str(wd / "checkpoints"))
  step = ckpt.latest_step()
  assert step is not None and step >= 1
  state, _ = ckpt.restore(step)
  leaves = jax.tree.leaves(state)
  assert leaves and all(np.all(np.isfinite(np.asarray(x))) for x in leaves
                        if np.issubdtype(np.asarray(x).dtype, np.floating))


# ------------------------------------------------------------------ sweep launchers
# Each launcher runs end to end (flags, sweep, tables, plots) on runs that a stand-in for
# train_and_evaluate fakes from the requested config in an instant: no training here.

FAKE_TRAIN = r'''
import json, math, os, sys
import stabjax.data, stabjax.run
from stabjax.degeneration import format_samples
from stabjax.run import config_to_dict

NO_GEN = bool(os.environ.get("FAKE_NO_GEN"))
# Per variant: the step at which the training loss reaches 2, and the HF plateau step.
LOSS_AT = {(True, True): 8, (True, False): 10, (False, True): 16}
HF_AT = {(True, True): 4, (True, False): 10, (False, True): 8}


class Tok:
  vocab_size = 123


class Data:
  tokenizer = Tok()


def load(cfg, seed=0):
  return Data()


def train(cfg, run_dir, dataset, show_progress=False):
  t, m = cfg.train, cfg.model
  unit = (m.dmu.enabled, m.dtu.enabled)
  os.makedirs(run_dir, exist_ok=True)
  with open(os.path.join(run_dir, "config.json"), "w") as f:
    json.dump(config_to_dict(cfg), f)
  history = []
  for step in range(1, t.steps + 1):
    loss = max(2.0, 6.0 - 4.0 * step / LOSS_AT[unit])
    history.append({"step": step, "loss": loss + t.alpha, "nll": loss,
                    "entropy": 1.0 + 0.5 * loss})
    if step % t.eval_every == 0 or step == t.steps:
      row = {"step": step, "val_loss": loss, "val_ppl": math.exp(loss)}
      if not NO_GEN:
        row["gen/hf_proportion"] = 1.0 if step >= HF_AT[unit] else 0.3
        row["gen/generative_entropy"] = 0.5 * loss - t.alpha
      history.append(row)
  hf = min(1.0, 0.25 + 2 * t.alpha + 0.01 * m.num_layers + 0.001 * (t.seed % 10))
  summary = {"status": "finished", "step": t.steps, "workdir": os.path.abspath(run_dir),
             "history": history, "final": {"loss": history[-2]["loss"], "val_ppl": 7.0 + t.alpha},
             "generation": {"sample": {"hf_proportion": hf, "hf_proportion_reference": 0.25,
                                       "generative_entropy": 3.0 - 10 * t.alpha},
                            "greedy": {"hf_proportion": 1.0}}}
  with open(os.path.join(run_dir, "summary.json"), "w") as f:
    json.dump(summary, f)
  with open(os.path.join(run_dir, "samples.txt"), "w") as f:
    f.write(format_samples({"prompts": [f"prompt {i} of seed {t.seed}" for i in range(3)],
                            "sample": [f"s{i} a={t.alpha:g}" for i in range(3)],
                            "greedy": [f"g{i} a={t.alpha:g}" for i in range(3)]}))
  return summary


stabjax.data.load_dataset = load
stabjax.run.train_and_evaluate = train
if os.environ.get("FAKE_PROCESS_INDEX"):  # one of the other processes of a multi-process sweep
  import jax
  jax.process_index = lambda backend=None: int(os.environ["FAKE_PROCESS_INDEX"])
import runpy
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
'''


def run_launcher(tmp_path, name, *args, env=None):
  """experiments/<name>.py with the fake training; (process, workdir)."""
  tmp_path.mkdir(parents=True, exist_ok=True)
  fake = tmp_path / "fake_train.py"
  fake.write_text(FAKE_TRAIN)
  wd = tmp_path / name
  proc = subprocess.run(
      [sys.executable, str(fake), os.path.join(REPO, "experiments", f"{name}.py"),
       f"--workdir={wd}", "--batch_size=4", "--seq_len=16", *args],
      capture_output=True, text=True, timeout=300, cwd=str(tmp_path),
      env=dict(os.environ, JAX_PLATFORMS="cpu", **(env or {})))
  return proc, wd


def test_table1_launcher_writes_tables_plot_and_side_by_side_samples(tmp_path):
  proc, wd = run_launcher(tmp_path, "table1", "--models=gpt2_tiny", "--seeds=1,2",
                          "--alphas=0,0.2", "--steps=10")
  assert proc.returncode == 0, proc.stderr[-2000:]
  from stabjax.plots import png_size
  assert png_size(str(wd / "table1.png"))[0] > 0
  md = (wd / "table1.md").read_text()
  assert "## Mean ± std across seeds (2 seed(s)" in md
  # hf = 0.25 + 2 alpha + 0.01 * 4 layers + 0.001 * seed: seeds 1 and 2 at alpha 0.2.
  assert "| gpt2_tiny | 0.2 | 2 |" in md and "69.2% ± 0.1%" in md
  out = json.loads((wd / "table1.json").read_text())
  assert out["paper_hf_percent"]["paper BERT 1B"] == {"0.0": 23.5, "0.05": 56.3, "0.2": 100.0}
  side = (wd / "samples_side_by_side.md").read_text()
  assert '### Prompt 1: "prompt 0 of seed 1"' in side
  assert "| sampling | s0 a=0 | s0 a=0.2 |" in side and "| greedy | g2 a=0 | g2 a=0.2 |" in side
  assert "seed 2" not in side


def test_ablation_launcher_reports_loss_and_hf_plateau_convergence(tmp_path):
  proc, wd = run_launcher(tmp_path, "ablation", "--seeds=1,2", "--alphas=0,0.2", "--steps=20",
                          "--eval_every=2", "--reuse_from=")
  assert proc.returncode == 0, proc.stderr[-2000:]
  md = (wd / "ablation.md").read_text()
  # Loss reaches 2 at steps 8 / 16 / 10 (full / nodmu / nodtu); the HF share settles at
  # 4 / 8 / 10. Full vs nodmu: 8/16 -> 50% faster (loss), 4/8 -> 50% (HF); vs nodtu:
  # 8/10 -> 20% (loss), 4/10 -> 60% (HF).
  assert "| full (DMU + DTU) | loss | 8 ± 0 | 8 ± 0 |" in md
  assert "| without DMU | HF plateau | 8 ± 0 | 8 ± 0 |" in md
  assert "| without DTU | HF plateau | 10 ± 0 | 10 ± 0 |" in md
  assert "| without DMU | loss | 50% faster | 50% faster |" in md
  assert "| without DTU | loss | 20% faster | 20% faster |" in md
  assert "| without DTU | HF plateau | 60% faster | 60% faster |" in md
  assert "plateau step is the first evaluation step" in md
  out = json.loads((wd / "ablation.json").read_text())
  speed = {(s["variant"], s["criterion"], s["alpha"]): s for s in out["speedups"]}
  assert speed["nodtu", "hf_plateau_step", 0.2]["ratios"] == [0.4, 0.4]
  assert {(r["variant"], r["hf_plateau_step"], r["hf_plateau_level"]) for r in out["runs"]} == {
      ("full", 4, 1.0), ("nodmu", 8, 1.0), ("nodtu", 10, 1.0)}

  # Runs without gen rows (trained before they were logged): em dashes, no crash.
  proc, wd = run_launcher(tmp_path / "old", "ablation", "--alphas=0", "--steps=20",
                          "--eval_every=2", "--reuse_from=", env={"FAKE_NO_GEN": "1"})
  assert proc.returncode == 0, proc.stderr[-2000:]
  md = (wd / "ablation.md").read_text()
  assert "| without DTU | HF plateau | — |" in md and "| without DTU | loss | 20% faster |" in md
  assert "have no `gen/hf_proportion` rows" in md


def test_trajectory_launcher_plots_generative_entropy_or_asks_for_a_rerun(tmp_path):
  proc, wd = run_launcher(tmp_path, "trajectory", "--steps=20")
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = json.loads((wd / "trajectory.json").read_text())
  # --eval_every defaults to 5 here: 4 generation points joined with the step's NLL.
  pts = out["points"]["0.2"]
  assert pts["eval_loss"] == [max(2.0, 6.0 - 4.0 * s / 8) for s in (5, 10, 15, 20)]
  assert pts["generative_entropy"] == pytest.approx([0.5 * x - 0.2 for x in pts["eval_loss"]])
  assert len(pts["loss"]) == 20
  run = {r["alpha"]: r for r in out["runs"]}[0.0]
  assert run["eval_points"] == 4 and "slope_high_loss" in run["generative"]
  for name in ("trajectory.png", "trajectory_predictive.png"):
    assert (wd / name).exists()

  proc, wd = run_launcher(tmp_path / "old", "trajectory", "--steps=20",
                          env={"FAKE_NO_GEN": "1"})
  assert proc.returncode == 1
  lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
  assert len(lines) == 1 and "gen/generative_entropy" in lines[0] and "rerun" in lines[0]
  assert not (wd / "trajectory.md").exists()


@pytest.mark.parametrize("name", ["table1", "trajectory"])
def test_only_process_zero_writes_a_sweeps_tables(tmp_path, name):
  """In a multi-process sweep every process runs every run; on the others
  (jax.process_index() = 1 here) the launcher writes and prints no table or plot."""
  grid = ("--models=gpt2_tiny", "--seeds=1", "--alphas=0,0.2", "--steps=10")
  proc, wd = run_launcher(tmp_path, name, *grid, env={"FAKE_PROCESS_INDEX": "1"})
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert sorted(os.listdir(wd)) == ["gpt2_tiny_s1_a0", "gpt2_tiny_s1_a0.2"]
  assert "wrote" not in proc.stdout
  proc, wd = run_launcher(tmp_path / "zero", name, *grid, env={"FAKE_PROCESS_INDEX": "0"})
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert (wd / f"{name}.md").exists() and "wrote" in proc.stdout


def test_scale_launcher_counts_parameters_and_the_alpha_effect(tmp_path):
  proc, wd = run_launcher(tmp_path, "scale", "--models=gpt2_tiny,bert_tiny", "--steps=4",
                          "--alphas=0,0.05,0.2")
  assert proc.returncode == 0, proc.stderr[-2000:]
  from stabjax import configs
  from stabjax.models import count_params
  out = json.loads((wd / "scale.json").read_text())
  for m in ("gpt2_tiny", "bert_tiny"):  # counted at the runs' vocabulary (123)
    assert out["params"][m] == count_params(configs.get_model_config(m, vocab_size=123))
  # hf = min(1, 0.25 + 2 alpha + 0.01 layers + 0.001 * (2025 % 10)): gpt2_tiny 0.295 -> 0.695.
  assert out["alpha_effect"]["hf_proportion"]["gpt2_tiny"] == pytest.approx(0.4)
  md = (wd / "scale.md").read_text()
  assert "4 steps × batch 4 × 16 tokens = 256 training tokens" in md
  assert "| gpt2_tiny | " + f"{out['params']['gpt2_tiny']:,}" + " | +40.0 points |" in md
  assert (wd / "scale.png").exists()
