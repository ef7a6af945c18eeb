"""The training loop's in-training degeneration measurement (run.train_and_evaluate)."""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
import optax
import pytest

from stabjax import configs, degeneration
from stabjax.checkpoint import Checkpointer
from stabjax.data import DataConfig, load_dataset
from stabjax.psu import PSUConfig
from stabjax.run import read_jsonl, special_ids, train_and_evaluate
from stabjax.train import RunConfig, Trainer


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  data = load_dataset(DataConfig(spec="synthetic", seq_len=24, synthetic_n=128,
                                 synthetic_n_validation=32, synthetic_vocab_size=64), seed=0)
  model = configs.get_model_config("gpt2_tiny", vocab_size=data.vocab_size, num_layers=1,
                                   d_model=32, d_ff=64, num_heads=2,
                                   dmu=configs.DMUConfig(), dtu=configs.DTUConfig(keep=4))
  cfg = RunConfig(
      model=model,
      train=configs.TrainConfig(steps=6, batch_size=4, seq_len=24, eval_every=3,
                                eval_batches=1, checkpoint_every=3, alpha=0.2, seed=1),
      psu=PSUConfig(), data=data.config,
      generation=degeneration.GenerationEvalConfig(num_samples=8, decoders=("sample",),
                                                   eval_gen_prompts=6, eval_gen_tokens=10,
                                                   seed=1))
  summary = train_and_evaluate(cfg, workdir, data, show_progress=False)
  return cfg, data, workdir, summary


def test_every_eval_step_logs_the_generated_hf_proportion_and_entropy(finished_run):
  _, _, workdir, _ = finished_run
  rows = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "val_loss" in r]
  assert [r["step"] for r in rows] == [3, 6]
  train_rows = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "loss" in r]
  assert all(r["perf/tokens_per_s_per_device"] > 0 for r in train_rows)
  assert not any("perf/mfu" in r for r in train_rows)  # no known peak on CPU
  for r in rows:
    assert 0.0 <= r["gen/hf_proportion"] <= 1.0
    assert r["gen/generative_entropy"] > 0.0
    assert r["val_entropy"] > 0.0


def test_logged_generation_metrics_equal_the_end_of_run_code_on_the_same_samples(finished_run):
  """Reload the last checkpoint and measure it with `degeneration.measure` (the end-of-run
  code) on the same prompts, tokens, decoder and key: the logged values must match."""
  cfg, data, workdir, _ = finished_run
  trainer = Trainer.create(cfg, special_ids(data.tokenizer))
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
  state, _ = ckpt.restore(6, trainer.abstract_state, trainer.state_shardings)
  ckpt.close()
  g = cfg.generation
  same = dataclasses.replace(g, num_samples=g.eval_gen_prompts,
                             max_new_tokens=g.eval_gen_tokens, decoders=("sample",))
  result, texts = degeneration.measure(trainer.model, jax.device_get(state.params), data, same)
  logged = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
            if r["step"] == 6 and "gen/hf_proportion" in r][0]
  assert len(texts["sample"]) == 6
  assert logged["gen/hf_proportion"] == pytest.approx(result["sample"]["hf_proportion"], abs=1e-9)
  assert logged["gen/generative_entropy"] == pytest.approx(
      result["sample"]["generative_entropy"], rel=1e-5)


def test_each_training_row_logs_the_learning_rate_of_its_update(finished_run):
  """Row `step` logs the rate of update step - 1 (computed in the train step): optax's
  warmup-cosine schedule, warmup clamped to steps - 1."""
  cfg, _, workdir, _ = finished_run
  t = cfg.train
  warmup = min(t.warmup_steps, t.steps - 1)
  ref = optax.warmup_cosine_decay_schedule(0.0, t.lr, warmup, t.steps,
                                           end_value=t.lr * t.min_lr_ratio)
  rows = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "loss" in r]
  assert [r["step"] for r in rows] == list(range(1, t.steps + 1))
  np.testing.assert_allclose([r["lr"] for r in rows],
                             [float(ref(r["step"] - 1)) for r in rows], rtol=2e-6)


def _train_rows(workdir):
  return [{k: v for k, v in r.items() if not k.startswith("perf/")}
          for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))]


def test_lagged_metrics_log_the_same_rows_and_train_the_same(finished_run, tmp_path):
  """--lagged_metrics reads each step's metrics after the next step is dispatched: the
  rows (but the timings), their order and the summary are those of the unlagged run."""
  cfg, data, workdir, summary = finished_run
  lagged = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lagged_metrics=True,
                                                              checkpoint_every=4))
  out = train_and_evaluate(lagged, str(tmp_path), data, show_progress=False)
  assert _train_rows(str(tmp_path)) == _train_rows(workdir)
  assert out["generation"] == summary["generation"]


@pytest.mark.parametrize("lagged", [False, True])
def test_a_non_finite_loss_names_its_step_with_or_without_lag(finished_run, tmp_path, lagged):
  """A lagged run reads a step's loss one step later, but still names that step (and
  never checkpoints a step whose loss it has not checked)."""
  from stabjax.run import NonFiniteLossError
  cfg, data, _, _ = finished_run
  bad = dataclasses.replace(cfg, psu=PSUConfig(enabled=False), train=dataclasses.replace(
      cfg.train, lr=1e38, clip_norm=1e30, warmup_steps=1, lagged_metrics=lagged,
      checkpoint_every=100, eval_every=100, steps=8))
  with pytest.raises(NonFiniteLossError, match=r"at step (\d+);") as err:
    train_and_evaluate(bad, str(tmp_path), data, show_progress=False)
  rows = read_jsonl(os.path.join(str(tmp_path), "metrics.jsonl"))
  first_bad = int(str(err.value).split("at step ")[1].split(";")[0])
  assert [r["step"] for r in rows] == list(range(1, first_bad))
  assert not os.path.exists(os.path.join(str(tmp_path), "checkpoints", str(first_bad)))
