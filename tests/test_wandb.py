"""Optional W&B logging (stabjax/logging_wandb.py) against a stand-in `wandb` module."""

from __future__ import annotations

import importlib.abc
import os
import sys
import types

import pytest
from absl import flags

from experiments import common
from stabjax import configs, degeneration, logging_wandb
from stabjax.data import DataConfig, load_dataset
from stabjax.psu import PSUConfig
from stabjax.run import train_and_evaluate
from stabjax.train import RunConfig


def fake_wandb():
  """A module with wandb's init / Run.log / Run.finish / Table that records every call."""
  calls = []

  class Run:
    def log(self, data, step=None):
      calls.append(("log", data, step))

    def finish(self):
      calls.append(("finish",))

  class Table:
    def __init__(self, columns, data):
      self.columns, self.data = columns, data

  def init(**kw):
    calls.append(("init", kw))
    return Run()

  return types.SimpleNamespace(init=init, Table=Table, calls=calls)


class Watch(importlib.abc.MetaPathFinder):
  """Records (and, with block=True, refuses) every attempt to import wandb."""

  def __init__(self, block=False):
    self.seen, self.block = [], block

  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] == "wandb":
      self.seen.append(name)
      if self.block:
        raise ImportError("blocked")
    return None


@pytest.fixture
def watch(monkeypatch):
  def make(block=False):
    w = Watch(block)
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    monkeypatch.setattr(sys, "meta_path", [w, *sys.meta_path])
    return w
  return make


def parse(*argv):
  fv = flags.FlagValues()
  common.define_run_flags(fv)
  fv(["prog", *argv])
  return fv


def test_wandb_is_not_imported_unless_asked(watch):
  w = watch()
  fv = parse()
  common.build_config(fv)
  assert common.make_logger(fv) is None
  assert w.seen == [] and "wandb" not in sys.modules


def test_missing_wandb_is_one_line(watch, capsys):
  w = watch(block=True)
  with pytest.raises(SystemExit) as e:
    common.make_logger(parse("--wandb_project=p"))
  err = capsys.readouterr().err.strip()
  assert e.value.code != 0 and w.seen and "\n" not in err and ".[wandb]" in err


class Writer:
  path = "metrics.jsonl"

  def __init__(self):
    self.rows, self.closed = [], False

  def write(self, step, scalars):
    self.rows.append((step, scalars))

  def write_texts(self, step, texts):
    self.rows.append((step, texts))

  def close(self):
    self.closed = True


def test_only_process_zero_logs(monkeypatch, tmp_path):
  wb = fake_wandb()
  monkeypatch.setitem(sys.modules, "wandb", wb)
  writer = Writer()
  logger = logging_wandb.WandbLogger("proj", process_index=1)
  assert logger.attach(writer, str(tmp_path), {}) is writer
  logger.finish({"step": 3}, {"prompts": ["p"], "sample": ["s"]})
  assert wb.calls == [] and not (tmp_path / "wandb_id").exists()

  mirrored = logging_wandb.WandbLogger("proj", "team", process_index=0).attach(
      writer, str(tmp_path), {"train": {"alpha": 0.2}})
  mirrored.write(5, {"loss": 1.5, "vector": [1.0, 2.0]})
  mirrored.write_texts(5, {"samples/0": "a ‖ b"})
  mirrored.close()
  init = wb.calls[0][1]
  assert (init["project"], init["entity"], init["resume"]) == ("proj", "team", "allow")
  assert init["id"] == (tmp_path / "wandb_id").read_text().strip()
  assert init["config"] == {"train": {"alpha": 0.2}}
  assert wb.calls[1] == ("log", {"loss": 1.5}, 5)  # scalars only; the file gets everything
  assert wb.calls[2][1]["samples"].data == [["samples/0", "a ‖ b"]]
  assert writer.rows == [(5, {"loss": 1.5, "vector": [1.0, 2.0]}),
                         (5, {"samples/0": "a ‖ b"})] and writer.closed
  assert mirrored.path == "metrics.jsonl"

  # A restart (a new process, a new logger) continues the same wandb run.
  logging_wandb.WandbLogger("proj", process_index=0).attach(Writer(), str(tmp_path), {})
  assert wb.calls[-1][0] == "init" and wb.calls[-1][1]["id"] == init["id"]


def test_a_run_logs_its_metrics_and_samples(monkeypatch, tmp_path):
  wb = fake_wandb()
  monkeypatch.setitem(sys.modules, "wandb", wb)
  data = load_dataset(DataConfig(spec="synthetic", seq_len=16, synthetic_n=64,
                                 synthetic_n_validation=16, synthetic_vocab_size=48), seed=0)
  model = configs.get_model_config("gpt2_tiny", vocab_size=data.vocab_size, num_layers=1,
                                   d_model=16, d_ff=32, num_heads=2)
  cfg = RunConfig(
      model=model,
      train=configs.TrainConfig(steps=4, batch_size=4, seq_len=16, eval_every=2,
                                eval_batches=1, checkpoint_every=4, log_every=1),
      psu=PSUConfig(enabled=False), data=data.config,
      generation=degeneration.GenerationEvalConfig(eval_gen_prompts=0))
  # The end-of-run measurement is tested elsewhere (and compiles a sampler): canned here.
  monkeypatch.setattr(degeneration, "measure", lambda *a: (
      {"greedy": {"hf_proportion": 0.5}},
      {"prompts": ["p0", "p1"], "greedy": ["c0", "c1"]}))
  wd = str(tmp_path / "run")
  train_and_evaluate(cfg, wd, data, show_progress=False,
                     logger=logging_wandb.WandbLogger("proj", process_index=0))
  run_id = open(os.path.join(wd, "wandb_id")).read().strip()
  assert wb.calls[0][0] == "init" and wb.calls[0][1]["id"] == run_id
  logs = [c for c in wb.calls if c[0] == "log"]
  assert [s for _, d, s in logs if "loss" in d] == [1, 2, 3, 4]
  assert [s for _, d, s in logs if "val_loss" in d] == [2, 4]
  final = [d for _, d, s in logs if "final_samples" in d][0]["final_samples"]
  assert final.columns == ["decoder", "prompt", "continuation"]
  assert final.data == [["greedy", "p0", "c0"], ["greedy", "p1", "c1"]]
  assert ("log", {"generation/greedy/hf_proportion": 0.5}, 4) in wb.calls
  assert wb.calls[-1] == ("finish",)
