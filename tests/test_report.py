"""stabjax.report: table writers, aggregation, sweep reuse and plots on fixed inputs."""

from __future__ import annotations

import json
import math
import os
import types

import numpy as np
import pytest

from stabjax import configs, report
from stabjax.train import RunConfig


def test_markdown_table_exact():
  got = report.markdown_table(["model", "α=0", "n"], [["gpt2", 0.123456, 3], ["bert", None, "x"]])
  assert got == ("| model | α=0 | n |\n|---|---|---|\n| gpt2 | 0.1235 | 3 |\n"
                 "| bert | — | x |")
  assert report.markdown_table(["d(p||q)"], [["a|b"]]) == "| d(p\\|\\|q) |\n|---|\n| a\\|b |"
  with pytest.raises(ValueError, match="2 cells, header 3"):
    report.markdown_table(["a", "b", "c"], [[1, 2]])


def test_formatting():
  assert report.fmt(1234.5678) == "1235"
  assert report.fmt(float("nan")) == "—"
  assert report.fmt(True) == "True"
  assert report.fmt(np.int64(7)) == "7"
  assert report.fmt_percent(0.675) == "67.5%"
  assert report.fmt_percent(1.0) == "100.0%"
  assert report.fmt_percent(None) == "—"
  assert report.fmt_mean_std((0.25, 0.0125), percent=True) == "25.0% ± 1.2%"
  assert report.fmt_mean_std((2.0, math.nan)) == "2"
  assert report.fmt_mean_std((3.14159, 0.5), digits=3) == "3.14 ± 0.5"
  assert report.run_name("gpt2_tiny", 2025, 0.05) == "gpt2_tiny_s2025_a0.05"
  assert report.run_name("bert_tiny", 1, 0.0, "nodtu") == "bert_tiny_s1_a0_nodtu"


def test_write_csv_and_json(tmp_path):
  recs = [{"model": "gpt2", "alpha": 0.05, "hf": 0.5}, {"model": "bert", "alpha": 0.2, "x": 3}]
  path = tmp_path / "t.csv"
  report.write_csv(str(path), recs)
  assert path.read_text() == "model,alpha,hf,x\ngpt2,0.05,0.5,\nbert,0.2,,3\n"
  jpath = tmp_path / "t.json"
  report.write_json(str(jpath), {"a": (1.5, float("nan")), "b": np.float32(0.25),
                                 "c": np.int64(3), 4: [float("inf")]})
  assert json.loads(jpath.read_text()) == {"a": [1.5, None], "b": 0.25, "c": 3, "4": [None]}


def test_seed_aggregate_matches_numpy():
  recs = [{"model": "m", "alpha": a, "seed": s, "hf": v, "ent": 10 * v}
          for a, vals in ((0.0, [0.2, 0.3, 0.4]), (0.2, [0.9, 1.0, 1.0]))
          for s, v in zip((1, 2, 3), vals)]
  out = report.seed_aggregate(recs, ["model", "alpha"], ["hf", "ent", "missing"])
  assert [(g["model"], g["alpha"], g["n"]) for g in out] == [("m", 0.0, 3), ("m", 0.2, 3)]
  for g, vals in zip(out, ([0.2, 0.3, 0.4], [0.9, 1.0, 1.0])):
    np.testing.assert_allclose(g["hf"], (np.mean(vals), np.std(vals, ddof=1)), rtol=1e-12)
    np.testing.assert_allclose(g["ent"], (10 * np.mean(vals), 10 * np.std(vals, ddof=1)),
                               rtol=1e-12)
    assert "missing" not in g


def test_run_record_and_metric_columns():
  summary = {"final": {"loss": 2.5, "entropy": 1.5, "val_loss": 2.0, "val_ppl": math.e ** 2},
             "psu": {"multiplier_mean": 0.8, "eta_mod_mean": 0.6},
             "generation": {"sample": {"hf_proportion": 0.75, "flag": True, "hist": [1, 2]},
                            "greedy": {"hf_proportion": 0.95},
                            "synthetic": {"forward_kl": 0.1, "support_mass": 0.9,
                                          "model_entropy": 3.0}}}
  rec = report.run_record({"model": "m", "alpha": 0.2}, summary)
  assert rec == {"model": "m", "alpha": 0.2, "train_loss": 2.5, "train_entropy": 1.5,
                 "val_loss": 2.0, "val_ppl": math.e ** 2, "psu_multiplier": 0.8,
                 "hf_proportion": 0.75, "greedy/hf_proportion": 0.95,
                 "syn/forward_kl": 0.1, "syn/support_mass": 0.9, "syn/model_entropy": 3.0}
  assert rec[report.decoder_key("greedy", "hf_proportion")] == 0.95
  cols = [k for k, _ in report.metric_columns([rec])]
  assert cols[-3:] == ["syn/support_mass", "syn/forward_kl", "syn/model_entropy"]
  assert "greedy/hf_proportion" in cols and "psu_multiplier" in cols
  assert cols == [k for k, _ in report.metric_columns([{"model": "bert"}, rec])]
  assert "syn/forward_kl" not in [k for k, _ in report.metric_columns([{"model": "bert"}])]


def test_parse_grid():
  assert report.parse_grid(["gpt2_tiny"], ["1", "2"], ["0", "0.05"]) == (
      ["gpt2_tiny"], [1, 2], [0.0, 0.05])
  for bad in ((["nope"], ["1"], ["0"]), (["gpt2_tiny"], ["x"], ["0"]),
              (["gpt2_tiny"], ["1"], ["-0.1"]), (["gpt2_tiny"], [], ["0"]),
              (["gpt2_tiny"], ["1"], ["nan"])):
    with pytest.raises(ValueError):
      report.parse_grid(*bad)


def test_convergence_steps_common_threshold():
  hist = {
      "full": [{"step": s, "loss": v} for s, v in zip((10, 20, 30, 40, 50), (5, 3, 2, 2, 2))],
      "nodtu": [{"step": s, "loss": v} for s, v in zip((10, 20, 30, 40, 50), (5, 4, 3, 2.5, 2.5))],
      "eval_rows_only": [{"step": 10, "val_loss": 1.0}, {"step": 10, "loss": 9}],
  }
  thr, steps = report.convergence_steps({k: hist[k] for k in ("full", "nodtu")}, tail=3)
  assert thr == pytest.approx((3 + 2.5 + 2.5) / 3)
  assert steps == {"full": 30, "nodtu": 40}
  thr, steps = report.convergence_steps(hist, tail=1)
  assert thr == 9 and steps == {"full": 10, "nodtu": 10, "eval_rows_only": 10}


def test_split_slopes_piecewise_linear():
  # Entropy falls 2 nats per nat of loss above loss 3 and 0.5 below: the paper's Figure 3.
  loss = np.linspace(6.0, 0.0, 61)
  ent = np.where(loss >= 3.0, 4.0 + 2.0 * (loss - 3.0), 4.0 + 0.5 * (loss - 3.0))
  out = report.split_slopes(loss, ent)
  assert out["median_loss"] == pytest.approx(3.0)
  assert out["slope_high_loss"] == pytest.approx(2.0, abs=1e-9)
  assert out["slope_low_loss"] == pytest.approx(0.5, abs=1e-9)
  assert math.isnan(report.split_slopes([1.0, 1.0], [2.0, 3.0])["slope_low_loss"])


def test_plots_are_pngs_of_the_requested_size(tmp_path):
  p = str(tmp_path / "lines.png")
  report.plot_lines(p, [0, 0.05, 0.2], {"gpt2": ([0.3, 0.6, 1.0], [0.01, 0.02, float("nan")]),
                                        "ref": ([0.3] * 3, None)},
                    xlabel="α", ylabel="%", percent=True, figsize=(4.0, 3.0), dpi=50)
  assert report.png_size(p) == (200, 150)
  p = str(tmp_path / "bars.png")
  report.plot_grouped_bars(p, ["α=0", "α=0.2"], [("hf", {"a": ([1, 2], [0.1, 0.1]),
                                                         "b": ([2, 1], None)}),
                                                 ("H", {"a": ([3, 4], None)})],
                           xlabel="α", figsize=(6.0, 2.0), dpi=50)
  assert report.png_size(p) == (300, 100)
  p = str(tmp_path / "density.png")
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=200), rng.normal(size=200)
  report.plot_density(p, x, y, xlabel="loss (nats)", ylabel="H (nats)", bins=10,
                      contours={"α=0.2": (x + 1, y - 1)}, figsize=(4.0, 4.0), dpi=40)
  assert report.png_size(p) == (160, 160)
  assert os.path.getsize(p) < 200_000
  txt = tmp_path / "not.png"
  txt.write_bytes(b"hello, this is not a png file")
  with pytest.raises(ValueError, match="not a PNG"):
    report.png_size(str(txt))


def _cfg(seed: int = 0, alpha: float = 0.0) -> RunConfig:
  return report.override_config(RunConfig(model=configs.get_model_config("gpt2_tiny")),
                                seed=seed, alpha=alpha)


def test_override_config():
  base = RunConfig(model=configs.get_model_config(
      "gpt2_tiny", dtype="bfloat16", dmu=configs.DMUConfig(c_tilde=0.3),
      dtu=configs.DTUConfig(keep=4)))
  cfg = report.override_config(base, model="bert_tiny", seed=7, alpha=0.2, dtu=False)
  assert (cfg.model.name, cfg.model.num_layers, cfg.model.dtype) == ("bert_tiny", 2, "bfloat16")
  assert cfg.model.dmu == configs.DMUConfig(c_tilde=0.3)
  assert cfg.model.dtu == configs.DTUConfig(enabled=False, keep=4)
  assert (cfg.train.seed, cfg.generation.seed, cfg.train.alpha) == (7, 7, 0.2)
  assert base.train.seed == 0 and base.model.name == "gpt2_tiny"


def test_run_sweep_trains_once_reuses_and_checks_configs(tmp_path):
  loads, trained = [], []

  def load(data_cfg, seed):
    loads.append((data_cfg.spec, seed))
    return types.SimpleNamespace(tokenizer=types.SimpleNamespace(vocab_size=123))

  def train(cfg, run_dir, dataset, show_progress):
    from stabjax.run import config_to_dict
    trained.append(os.path.basename(run_dir))
    assert cfg.model.vocab_size == 123
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
      json.dump(config_to_dict(cfg), f)
    status = "preempted" if cfg.train.alpha == 0.5 else "finished"
    summary = {"status": status, "step": 1, "alpha": cfg.train.alpha, "workdir": run_dir}
    if status == "finished":
      with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f)
    return summary

  runs = [report.SweepRun(report.run_name("gpt2_tiny", s, a), _cfg(s, a), {})
          for s in (1, 2) for a in (0.0, 0.2)]
  kw = dict(load_dataset=load, train=train, log=lambda _: None)
  out = report.run_sweep(runs, str(tmp_path / "a"), **kw)
  assert [s["alpha"] for s in out] == [0.0, 0.2, 0.0, 0.2]
  assert trained == ["gpt2_tiny_s1_a0", "gpt2_tiny_s1_a0.2", "gpt2_tiny_s2_a0", "gpt2_tiny_s2_a0.2"]
  assert loads == [("synthetic", 1)]  # the default synthetic data does not depend on the seed

  trained.clear()
  assert [s["alpha"] for s in report.run_sweep(runs, str(tmp_path / "a"), **kw)] == [
      0.0, 0.2, 0.0, 0.2]
  assert trained == []

  # Another sweep reuses a finished run of the same name and config, trains the rest.
  more = runs[:1] + [report.SweepRun("gpt2_tiny_s3_a0", _cfg(3, 0.0), {})]
  out = report.run_sweep(more, str(tmp_path / "b"), reuse_from=[str(tmp_path / "a")], **kw)
  assert trained == ["gpt2_tiny_s3_a0"]
  assert out[0]["workdir"].startswith(str(tmp_path / "a"))

  # Same name, another config: refused, nothing trained.
  trained.clear()
  clash = [report.SweepRun("gpt2_tiny_s1_a0", _cfg(1, 0.05), {})]
  with pytest.raises(ValueError, match="train.alpha"):
    report.run_sweep(clash, str(tmp_path / "a"), **kw)
  assert trained == []

  # A preempted run stops the sweep there.
  stop = [report.SweepRun("p", _cfg(1, 0.5), {}), report.SweepRun("q", _cfg(1, 0.7), {})]
  out = report.run_sweep(stop, str(tmp_path / "c"), **kw)
  assert [s["status"] for s in out] == ["preempted"] and trained == ["p"]
