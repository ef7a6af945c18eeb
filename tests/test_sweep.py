"""stabjax.sweep: run names, config overrides, sweep reuse and config checks, run records."""

from __future__ import annotations

import ast
import glob
import json
import math
import os
import types

import pytest

from stabjax import configs, sweep
from stabjax.train import RunConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_run_name():
  assert sweep.run_name("gpt2_tiny", 2025, 0.05) == "gpt2_tiny_s2025_a0.05"
  assert sweep.run_name("bert_tiny", 1, 0.0, "nodtu") == "bert_tiny_s1_a0_nodtu"


def test_run_record_and_metric_columns():
  summary = {"final": {"loss": 2.5, "entropy": 1.5, "val_loss": 2.0, "val_ppl": math.e ** 2},
             "psu": {"multiplier_mean": 0.8, "eta_mod_mean": 0.6},
             "generation": {"sample": {"hf_proportion": 0.75, "flag": True, "hist": [1, 2]},
                            "greedy": {"hf_proportion": 0.95},
                            "synthetic": {"forward_kl": 0.1, "support_mass": 0.9,
                                          "model_entropy": 3.0}}}
  rec = sweep.run_record({"model": "m", "alpha": 0.2}, summary)
  assert rec == {"model": "m", "alpha": 0.2, "train_loss": 2.5, "train_entropy": 1.5,
                 "val_loss": 2.0, "val_ppl": math.e ** 2, "psu_multiplier": 0.8,
                 "hf_proportion": 0.75, "greedy/hf_proportion": 0.95,
                 "syn/forward_kl": 0.1, "syn/support_mass": 0.9, "syn/model_entropy": 3.0}
  assert rec[sweep.decoder_key("greedy", "hf_proportion")] == 0.95
  cols = [k for k, _ in sweep.metric_columns([rec])]
  assert cols[-3:] == ["syn/support_mass", "syn/forward_kl", "syn/model_entropy"]
  assert "greedy/hf_proportion" in cols and "psu_multiplier" in cols
  assert cols == [k for k, _ in sweep.metric_columns([{"model": "bert"}, rec])]
  assert "syn/forward_kl" not in [k for k, _ in sweep.metric_columns([{"model": "bert"}])]


def test_parse_grid():
  assert sweep.parse_grid(["gpt2_tiny"], ["1", "2"], ["0", "0.05"]) == (
      ["gpt2_tiny"], [1, 2], [0.0, 0.05])
  for bad in ((["nope"], ["1"], ["0"]), (["gpt2_tiny"], ["x"], ["0"]),
              (["gpt2_tiny"], ["1"], ["-0.1"]), (["gpt2_tiny"], [], ["0"]),
              (["gpt2_tiny"], ["1"], ["nan"])):
    with pytest.raises(ValueError):
      sweep.parse_grid(*bad)


def test_read_samples_and_sample_words(tmp_path):
  from stabjax.degeneration import format_samples
  (tmp_path / "samples.txt").write_text(format_samples(
      {"prompts": ["The cat", "A dog"], "sample": ["the the cat", "a b"], "greedy": ["x", "y"]}))
  got = sweep.read_samples(str(tmp_path))
  assert got == {"prompts": ["The cat", "A dog"], "sample": ["the the cat", "a b"],
                 "greedy": ["x", "y"]}
  assert sweep.sample_words(str(tmp_path)) == ["the", "the", "cat", "a", "b"]
  assert sweep.read_samples(str(tmp_path / "none")) == {}
  assert sweep.sample_words(str(tmp_path / "none")) == []


def test_count_params_at_the_runs_vocabulary(tmp_path):
  from stabjax.models import count_params
  model = configs.get_model_config("gpt2_tiny")
  n = sweep.count_params(model)
  assert n == count_params(model)
  # The run used a 320-token vocabulary: its count is smaller by the embedding rows
  # (tied output), d_model = 128 each.
  (tmp_path / "config.json").write_text(json.dumps({"model": {"vocab_size": 320}}))
  assert sweep.run_param_count({"workdir": str(tmp_path)}, model) == n - (4096 - 320) * 128
  assert sweep.run_param_count({"num_params": 7, "workdir": str(tmp_path)}, model) == 7


def _cfg(seed: int = 0, alpha: float = 0.0, **kw) -> RunConfig:
  return sweep.override_config(RunConfig(model=configs.get_model_config("gpt2_tiny")),
                               seed=seed, alpha=alpha, **kw)


def test_override_config():
  base = RunConfig(model=configs.get_model_config(
      "gpt2_tiny", dtype="bfloat16", dmu=configs.DMUConfig(c_tilde=0.3),
      dtu=configs.DTUConfig(keep=4)))
  cfg = sweep.override_config(base, model="bert_tiny", seed=7, alpha=0.2, dtu=False)
  assert (cfg.model.name, cfg.model.num_layers, cfg.model.dtype) == ("bert_tiny", 2, "bfloat16")
  assert cfg.model.dmu == configs.DMUConfig(c_tilde=0.3)
  assert cfg.model.dtu == configs.DTUConfig(enabled=False, keep=4)
  assert (cfg.train.seed, cfg.generation.seed, cfg.train.alpha) == (7, 7, 0.2)
  assert base.train.seed == 0 and base.model.name == "gpt2_tiny"
  assert (cfg.train.feedback, cfg.train.feedback_target) == (base.train.feedback, None)


def test_override_config_feedback_pass_through():
  base = RunConfig(model=configs.get_model_config("gpt2_tiny"))
  cfg = sweep.override_config(base, feedback="ema", alpha=0.05)
  assert (cfg.train.feedback, cfg.train.feedback_target, cfg.train.alpha) == ("ema", None, 0.05)
  cfg = sweep.override_config(base, feedback="data", feedback_target=2.5)
  assert (cfg.train.feedback, cfg.train.feedback_target) == ("data", 2.5)
  # None leaves the base's value; the other fields are untouched.
  again = sweep.override_config(cfg, feedback=None, feedback_target=None, seed=3)
  assert (again.train.feedback, again.train.feedback_target, again.train.seed) == (
      "data", 2.5, 3)
  assert dict(vars(again.train), seed=0) == dict(vars(cfg.train), seed=0)
  assert sweep.override_config(base, feedback="psu_only").train.feedback == "psu_only"


def _fake_train(trained):
  def train(cfg, run_dir, dataset, show_progress):
    from stabjax.run import config_to_dict
    trained.append(os.path.basename(run_dir))
    assert cfg.model.vocab_size == 123
    if cfg.train.feedback == "data" and cfg.train.feedback_target is None:
      # As train_and_evaluate does: the setpoint is resolved from the data.
      cfg = sweep.override_config(cfg, feedback_target=3.25)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
      json.dump(config_to_dict(cfg), f)
    status = "preempted" if cfg.train.alpha == 0.5 else "finished"
    summary = {"status": status, "step": 1, "alpha": cfg.train.alpha, "workdir": run_dir}
    if status == "finished":
      with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f)
    return summary
  return train


def _fake_load(loads):
  def load(data_cfg, seed):
    loads.append((data_cfg.spec, seed))
    return types.SimpleNamespace(tokenizer=types.SimpleNamespace(vocab_size=123))
  return load


def test_run_sweep_trains_once_reuses_and_checks_configs(tmp_path):
  loads, trained = [], []
  runs = [sweep.SweepRun(sweep.run_name("gpt2_tiny", s, a), _cfg(s, a), {})
          for s in (1, 2) for a in (0.0, 0.2)]
  kw = dict(load_dataset=_fake_load(loads), train=_fake_train(trained), log=lambda _: None)
  out = sweep.run_sweep(runs, str(tmp_path / "a"), **kw)
  assert [s["alpha"] for s in out] == [0.0, 0.2, 0.0, 0.2]
  assert trained == ["gpt2_tiny_s1_a0", "gpt2_tiny_s1_a0.2", "gpt2_tiny_s2_a0", "gpt2_tiny_s2_a0.2"]
  assert loads == [("synthetic", 1)]  # the default synthetic data does not depend on the seed

  trained.clear()
  assert [s["alpha"] for s in sweep.run_sweep(runs, str(tmp_path / "a"), **kw)] == [
      0.0, 0.2, 0.0, 0.2]
  assert trained == []

  # Another sweep reuses a finished run of the same name and config, trains the rest.
  more = runs[:1] + [sweep.SweepRun("gpt2_tiny_s3_a0", _cfg(3, 0.0), {})]
  out = sweep.run_sweep(more, str(tmp_path / "b"), reuse_from=[str(tmp_path / "a")], **kw)
  assert trained == ["gpt2_tiny_s3_a0"]
  assert out[0]["workdir"].startswith(str(tmp_path / "a"))

  # Same name, another config: refused, nothing trained.
  trained.clear()
  clash = [sweep.SweepRun("gpt2_tiny_s1_a0", _cfg(1, 0.05), {})]
  with pytest.raises(ValueError, match="train.alpha"):
    sweep.run_sweep(clash, str(tmp_path / "a"), **kw)
  assert trained == []

  # A preempted run stops the sweep there.
  stop = [sweep.SweepRun("p", _cfg(1, 0.5), {}), sweep.SweepRun("q", _cfg(1, 0.7), {})]
  out = sweep.run_sweep(stop, str(tmp_path / "c"), **kw)
  assert [s["status"] for s in out] == ["preempted"] and trained == ["p"]


def test_run_sweep_feedback_target_resolved_at_run_time(tmp_path):
  """A requested feedback_target of None matches the value the run wrote to config.json; a
  requested float must equal it."""
  loads, trained = [], []
  kw = dict(load_dataset=_fake_load(loads), train=_fake_train(trained), log=lambda _: None)
  data = lambda target=None: [sweep.SweepRun("d", _cfg(1, 0.2, feedback="data",
                                                       feedback_target=target), {})]
  wd = str(tmp_path / "a")
  sweep.run_sweep(data(), wd, **kw)
  assert trained == ["d"]
  assert json.load(open(os.path.join(wd, "d", "config.json")))["train"]["feedback_target"] == 3.25
  for requested in (None, 3.25):  # reused: None is resolved to 3.25, 3.25 is 3.25
    out = sweep.run_sweep(data(requested), wd, **kw)
    assert trained == ["d"] and out[0]["status"] == "finished"
  with pytest.raises(ValueError, match="train.feedback_target"):
    sweep.run_sweep(data(2.0), wd, **kw)
  # Reuse from another sweep follows the same rule.
  out = sweep.run_sweep(data(), str(tmp_path / "b"), reuse_from=[wd], **kw)
  assert trained == ["d"] and out[0]["workdir"].startswith(wd)
  out = sweep.run_sweep(data(2.0), str(tmp_path / "c"), reuse_from=[wd], **kw)
  assert trained == ["d", "d"]  # not reused: trained anew in c/
  # A different feedback form is never equal, whatever the target.
  with pytest.raises(ValueError, match="train.feedback"):
    sweep.run_sweep([sweep.SweepRun("d", _cfg(1, 0.2, feedback="ema"), {})], wd, **kw)


LAUNCHERS = {"table1", "ablation", "trajectory", "scale", "main", "mechanism"}


def _imported_modules(path: str) -> set[str]:
  out = set()
  for node in ast.walk(ast.parse(open(path).read(), path)):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      mod = node.module or ""
      out.add(mod)
      out.update(f"{mod}.{a.name}" if mod else a.name for a in node.names)
  return out


def test_launchers_do_not_import_one_another(tmp_path):
  # The check catches both spellings.
  probe = tmp_path / "probe.py"
  probe.write_text("from experiments import common, table1\nimport experiments.ablation\n")
  assert {"experiments.table1", "experiments.ablation", "experiments.common"} <= (
      _imported_modules(str(probe)))
  files = glob.glob(os.path.join(REPO, "experiments", "*.py"))
  assert {"table1", "ablation", "trajectory", "scale"} <= {
      os.path.basename(f)[:-3] for f in files}
  for path in files:
    bad = {m for m in _imported_modules(path)
           if m.split(".")[-1] in LAUNCHERS and (m.startswith("experiments") or "." not in m)}
    assert not bad, f"{os.path.basename(path)} imports launcher(s) {sorted(bad)}"


def test_sweep_module_has_no_flags_and_no_matplotlib():
  mods = _imported_modules(sweep.__file__)
  assert not any(m.startswith(("absl", "matplotlib")) for m in mods), mods
