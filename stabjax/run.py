"""One training run, end to end: the loop around `train.Trainer` (SPEC sections 7 and 10).

`train_and_evaluate(cfg, workdir, dataset)` trains, evaluates, checkpoints and resumes.
Its workdir holds config.json, metrics.jsonl, TensorBoard events under tb/, checkpoints/,
and summary.json. A workdir with checkpoints resumes from the latest one; SIGTERM saves a
checkpoint and returns cleanly; a non-finite loss raises `NonFiniteLossError` before
anything bad is saved.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from tensorboardX import SummaryWriter

from stabjax import degeneration, sharding
from stabjax.checkpoint import Checkpointer, SigtermFlag
from stabjax.data import make_iterator
from stabjax.optim import lr_schedule
from stabjax.train import RunConfig, SpecialIds, Trainer


class NonFiniteLossError(RuntimeError):
  """The loss became NaN/inf; the last checkpoint on disk is the last good state."""


def config_to_dict(cfg: RunConfig) -> dict:
  return dataclasses.asdict(cfg)


class MetricWriter:
  """metrics.jsonl (one JSON object per logged step) plus TensorBoard scalars."""

  def __init__(self, workdir: str, resume_step: int):
    self.path = os.path.join(workdir, "metrics.jsonl")
    rows = read_jsonl(self.path)
    # A resumed run replays the steps after its checkpoint: drop what it will log again.
    with open(self.path, "w") as f:
      for row in rows:
        if row["step"] <= resume_step:
          f.write(json.dumps(row) + "\n")
    self._tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=resume_step + 1)

  def write(self, step: int, scalars: dict[str, Any]) -> None:
    row = {"step": step, **{k: _to_py(v) for k, v in scalars.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    for k, v in row.items():
      if k != "step" and isinstance(v, (int, float)):
        self._tb.add_scalar(k, v, step)

  def write_texts(self, step: int, texts: dict[str, str]) -> None:
    """TensorBoard text (e.g. sample continuations); not in metrics.jsonl."""
    for tag, text in texts.items():
      self._tb.add_text(tag, text, step)

  def close(self) -> None:
    self._tb.close()


def read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _to_py(v):
  v = np.asarray(v)
  return v.item() if v.size == 1 else v.tolist()


def special_ids(tokenizer) -> SpecialIds:
  return SpecialIds(pad=tokenizer.pad_id, bos=tokenizer.bos_id, eos=tokenizer.eos_id,
                    mask=tokenizer.mask_id)


def evaluate(trainer: Trainer, params, dataset, cfg: RunConfig) -> dict[str, float]:
  """Validation loss, perplexity and mean predictive entropy on the first `eval_batches`
  validation batches."""
  t = cfg.train
  it = make_iterator(dataset, "validation", t.batch_size, t.seed,
                     process_index=jax.process_index(), process_count=jax.process_count())
  key = jax.random.PRNGKey(t.seed + 1)  # fixed: the same masks (BERT) at every evaluation
  nll, ent, tokens = 0.0, 0.0, 0.0
  for _ in range(t.eval_batches):
    try:
      batch = next(it)
    except StopIteration:
      break
    out = jax.device_get(trainer.eval_step(params, trainer.put_batch(batch), key))
    nll += float(out["nll_sum"])
    ent += float(out["entropy_sum"])
    tokens += float(out["tokens"])
  val_loss = nll / max(tokens, 1.0)
  return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)),
          "val_entropy": ent / max(tokens, 1.0)}


# The in-training generation metrics' keys in metrics.jsonl (and TensorBoard).
GEN_PREFIX = "gen/"


def evaluate_generation(trainer: Trainer, params, dataset, cfg: RunConfig
                        ) -> tuple[dict[str, float], dict[str, str]]:
  """The small generation batch of an evaluation step (`degeneration.measure_quick`, the
  end-of-run code on `eval_gen_prompts` prompts x `eval_gen_tokens` tokens, sampling):
  ({'gen/hf_proportion', 'gen/generative_entropy'}, two continuations for TensorBoard)."""
  g = cfg.generation
  values, texts = degeneration.measure_quick(trainer.model, params, dataset, g,
                                             num_prompts=g.eval_gen_prompts,
                                             max_new_tokens=g.eval_gen_tokens)
  shown = {f"samples/{i}": f"{p} ‖ {c}"
           for i, (p, c) in enumerate(zip(texts["prompts"][:2], texts["sample"][:2]))}
  return {GEN_PREFIX + k: v for k, v in values.items()}, shown


def resolve_feedback_target(cfg: RunConfig, dataset) -> RunConfig:
  """`cfg` with the 'data' feedback form's H_data filled in where the data defines it.

  Synthetic data: the language's exact conditional entropy per predicted token
  (`SyntheticLanguage.entropy_per_token`). Text has no exact value: the setpoint must be
  given (`--feedback_target`; experiments/mechanism.py passes the alpha = 0 run's
  validation entropy), else ValueError with one line.
  """
  t = cfg.train
  if t.feedback != "data" or t.feedback_target is not None:
    return cfg
  if dataset.synthetic is None:
    raise ValueError(f"--feedback=data on {cfg.data.spec} needs --feedback_target=H_data (nats "
                     f"per predicted token; e.g. the val_entropy of an alpha=0 run): text has "
                     f"no exact entropy")
  target = round(float(dataset.synthetic.entropy_per_token()), 6)
  return dataclasses.replace(cfg, train=dataclasses.replace(t, feedback_target=target))


def _all_finite(tree) -> bool:
  return bool(jax.device_get(jax.tree.reduce(
      lambda a, b: a & b, jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)), tree))))


def train_and_evaluate(cfg: RunConfig, workdir: str, dataset, *, show_progress: bool = True
                       ) -> dict[str, Any]:
  """Train (or resume) in `workdir`; returns the summary also written to summary.json."""
  cfg = resolve_feedback_target(cfg, dataset)
  t = cfg.train
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config_to_dict(cfg), f, indent=2)

  trainer = Trainer.create(cfg, special_ids(dataset.tokenizer))
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=t.keep_checkpoints)
  iterator_kw = dict(process_index=jax.process_index(), process_count=jax.process_count())
  start = ckpt.latest_step()
  if start is None:
    state = trainer.init_state()
    train_it = make_iterator(dataset, "train", t.batch_size, t.seed, **iterator_kw)
    start = 0
  else:
    state, data_state = ckpt.restore(start, trainer.abstract_state, trainer.state_shardings)
    train_it = make_iterator(dataset, "train", t.batch_size, t.seed, state=data_state,
                             **iterator_kw)
  writer = MetricWriter(workdir, resume_step=start)
  neg_log_freq = jax.device_put(jnp.asarray(dataset.neg_log_freq, jnp.float32),
                                sharding.replicated(trainer.mesh))

  step, status = start, "finished"
  tokens_per_step = t.batch_size * t.seq_len
  with SigtermFlag() as sigterm, tqdm.tqdm(total=t.steps, initial=start, desc="train",
                                           disable=not show_progress, unit="step") as bar:
    last_time = time.perf_counter()
    while step < t.steps:
      batch = trainer.put_batch(next(train_it))
      state, metrics = trainer.train_step(state, batch, neg_log_freq)
      step += 1
      metrics = jax.device_get(metrics)
      if not np.isfinite(metrics["loss"]):
        ckpt.close()
        writer.close()
        raise NonFiniteLossError(
            f"non-finite loss ({metrics['loss']}) at step {step}; the last good checkpoint is "
            f"step {ckpt.latest_step()} in {ckpt.directory}")
      now = time.perf_counter()
      bar.set_postfix(loss=f"{metrics['loss']:.3f}", H=f"{metrics['entropy']:.3f}",
                      tok_s=f"{tokens_per_step / max(now - last_time, 1e-9):,.0f}")
      bar.update(1)
      last_time = now
      if step % t.log_every == 0 or step == t.steps:
        writer.write(step, {**metrics, "lr": lr_schedule(t)(step - 1)})
      if step % t.eval_every == 0 or step == t.steps:
        row = evaluate(trainer, state.params, dataset, cfg)
        if cfg.generation.eval_gen_prompts:
          gen, shown = evaluate_generation(trainer, state.params, dataset, cfg)
          row.update(gen)
          writer.write_texts(step, shown)
        writer.write(step, row)
      stop = bool(sigterm) or ckpt.reached_preemption(step)
      if step % t.checkpoint_every == 0 or step == t.steps or stop:
        if not _all_finite(state.params):
          ckpt.close()
          writer.close()
          raise NonFiniteLossError(
              f"non-finite parameters after step {step}; not saved; the last good checkpoint is "
              f"step {ckpt.latest_step()} in {ckpt.directory}")
        ckpt.save(step, state, train_it.state.to_dict())
      if stop:
        status = "preempted"
        break
  ckpt.close()
  writer.close()

  summary = {"status": status, "step": step, "workdir": os.path.abspath(workdir),
             "history": read_jsonl(writer.path)}
  if status == "finished":
    summary.update(final_summary(summary["history"]))
    gen_metrics, texts = degeneration.measure(trainer.model, state.params, dataset,
                                              cfg.generation)
    summary["generation"] = gen_metrics
    with open(os.path.join(workdir, "samples.txt"), "w") as f:
      f.write(degeneration.format_samples(texts))
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
  return summary


def final_summary(history: list[dict]) -> dict[str, Any]:
  """Last value of each logged metric, and the PSU's schedule averaged over logged steps."""
  last: dict[str, Any] = {}
  for row in history:
    last.update({k: v for k, v in row.items() if k != "step"})
  out: dict[str, Any] = {"final": last}
  psu_keys = ("multiplier", "eta_mod", "gamma", "active_share", "a_tilde")
  rows = [r for r in history if "psu/multiplier" in r]
  if rows:
    out["psu"] = {f"{k}_mean": float(np.mean([r[f"psu/{k}"] for r in rows])) for k in psu_keys}
  return out
