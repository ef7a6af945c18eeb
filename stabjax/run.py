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
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from tensorboardX import SummaryWriter

from stabjax import degeneration, sharding, throughput
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
    # A resumed run replays the steps after its checkpoint: drop what it will log again
    # (rewritten through a temporary file: a full disk must not lose the kept rows).
    _write_file(self.path, "".join(json.dumps(r) + "\n" for r in rows
                                   if r["step"] <= resume_step))
    self._tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=resume_step + 1)

  def write(self, step: int, scalars: dict[str, Any]) -> None:
    row = {"step": step, **{k: _to_py(v) for k, v in scalars.items()}}
    _append_line(self.path, json.dumps(row))
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


class WorkdirError(RuntimeError):
  """The workdir cannot be used as asked; `str(e)` is one line saying why and what to do."""


# Settings a resumed run may change: they decide what is measured, logged or kept and
# where it runs, not what is trained. Keys are dotted paths into config.json; a section
# name covers the whole section.
RESUMABLE = ("generation", "data.cache_dir", "train.eval_every", "train.eval_batches",
             "train.checkpoint_every", "train.keep_checkpoints", "train.log_every",
             "train.mesh")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for k, v in tree.items():
    out.update(_flatten(v, f"{prefix}.{k}" if prefix else k))
  return out


def config_changes(old: dict, new: dict) -> tuple[dict[str, tuple], dict[str, list]]:
  """(refused, allowed) differences between two config.json dicts, as {dotted key: (old,
  new)}: allowed are those under `RESUMABLE`, refused every other (training) setting."""
  a, b = _flatten(old), _flatten(new)
  diff = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
  resumable = lambda k: any(k == r or k.startswith(r + ".") for r in RESUMABLE)  # noqa: E731
  return ({k: v for k, v in diff.items() if not resumable(k)},
          {k: list(v) for k, v in diff.items() if resumable(k)})


class WorkdirLock:
  """An exclusive `flock` on WORKDIR/.lock while a run trains there.

  The kernel drops the lock when the process dies, so a killed run never leaves it stuck.
  (flock needs a local or NFS file system; cloud paths are not locked.)
  """

  def __init__(self, workdir: str):
    self.workdir = workdir
    self._file = None

  def __enter__(self) -> "WorkdirLock":
    import fcntl
    f = open(os.path.join(self.workdir, ".lock"), "a+")
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or "unknown"
      f.close()
      raise WorkdirError(f"{self.workdir} is in use by another run (pid {holder}); wait for it "
                         f"to finish or use another --workdir") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    self._file = f
    return self

  def __exit__(self, *exc) -> None:
    import fcntl
    fcntl.flock(self._file, fcntl.LOCK_UN)
    self._file.close()


def _write_file(path: str, text: str) -> None:
  """Write `text` to `path` through a temporary file, so a full disk never leaves half a
  file; WorkdirError (one line) when it cannot be written."""
  tmp = path + ".tmp"
  try:
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, path)
  except OSError as e:
    raise WorkdirError(f"cannot write {path}: {e.strerror}; free disk space or fix "
                       f"permissions, then run the same command again") from None


def _append_line(path: str, line: str) -> None:
  try:
    with open(path, "a") as f:
      f.write(line + "\n")
  except OSError as e:
    raise WorkdirError(f"cannot write {path}: {e.strerror}") from None


def _close_quietly(ckpt: Checkpointer, writer: "MetricWriter | None") -> None:
  """Close after an error without raising a second one (the first says what happened)."""
  for close in (ckpt.close, writer.close if writer is not None else None):
    if close is not None:
      try:
        close()
      except Exception:  # noqa: BLE001
        pass


def train_and_evaluate(cfg: RunConfig, workdir: str, dataset, *, show_progress: bool = True,
                       init_params: Any = None) -> dict[str, Any]:
  """Train (or resume) in `workdir`; returns the summary also written to summary.json.

  Guards (each a one-line error, nothing of the earlier run changed): `WorkdirError` when
  the workdir holds a run with other training settings (`config_changes`) or another live
  run holds its lock, or a file cannot be written; `CheckpointError` when no checkpoint
  restores or one cannot be written. A corrupt newest checkpoint is moved aside with a
  warning and the run resumes from the one before. `init_params` (the weights of
  `cfg.init_from`) replace the random init of a fresh run (`Trainer.create`).
  """
  cfg = resolve_feedback_target(cfg, dataset)
  config = json.loads(json.dumps(config_to_dict(cfg)))
  config_path = os.path.join(workdir, "config.json")
  allowed: dict[str, list] = {}
  if os.path.exists(config_path):
    with open(config_path) as f:
      refused, allowed = config_changes(json.load(f), config)
    if refused:
      raise WorkdirError(
          f"{workdir} holds a run with other training settings ("
          + "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
          + "); resume it with its own flags or use another --workdir")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f"cannot create {workdir}: {e.strerror}") from None
  with WorkdirLock(workdir):
    _write_file(config_path, json.dumps(config, indent=2))
    if allowed:  # evaluation / logging settings changed on resume: keep a record
      _append_line(os.path.join(workdir, "resumes.jsonl"), json.dumps(
          {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "changed": allowed}))
    return _train(cfg, workdir, dataset, show_progress, init_params)


def _train(cfg: RunConfig, workdir: str, dataset, show_progress: bool,
           init_params: Any = None) -> dict[str, Any]:
  t = cfg.train
  trainer = Trainer.create(cfg, special_ids(dataset.tokenizer), init_params=init_params)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=t.keep_checkpoints)
  iterator_kw = dict(process_index=jax.process_index(), process_count=jax.process_count())
  writer = None
  try:
    start, state, data_state = ckpt.restore_latest_intact(
        trainer.abstract_state, trainer.state_shardings,
        warn=lambda m: print(m, file=sys.stderr))
    if start is None:
      state, start = trainer.init_state(), 0
    train_it = make_iterator(dataset, "train", t.batch_size, t.seed, state=data_state,
                             **iterator_kw)
    writer = MetricWriter(workdir, resume_step=start)
    step, status, state = _loop(cfg, trainer, dataset, ckpt, writer, state, train_it, start,
                                show_progress)
  except BaseException:
    _close_quietly(ckpt, writer)
    raise
  ckpt.close()
  writer.close()

  summary = {"status": status, "step": step, "workdir": os.path.abspath(workdir),
             "history": read_jsonl(writer.path)}
  if status == "finished":
    summary.update(final_summary(summary["history"]))
    gen_metrics, texts = degeneration.measure(trainer.model, state.params, dataset,
                                              cfg.generation)
    summary["generation"] = gen_metrics
    _write_file(os.path.join(workdir, "samples.txt"), degeneration.format_samples(texts))
    _write_file(os.path.join(workdir, "summary.json"), json.dumps(summary, indent=2))
  return summary


def _loop(cfg, trainer, dataset, ckpt, writer, state, train_it, start, show_progress):
  """The training loop from `start`; (last step, 'finished' | 'preempted', state)."""
  t = cfg.train
  neg_log_freq = jax.device_put(jnp.asarray(dataset.neg_log_freq, jnp.float32),
                                sharding.replicated(trainer.mesh))
  step, status = start, "finished"
  tokens_per_step = t.batch_size * t.seq_len
  flops_per_token, _ = throughput.model_flops_per_token(cfg.model, t.seq_len)
  peak = throughput.peak_tflops()
  with SigtermFlag() as sigterm, tqdm.tqdm(total=t.steps, initial=start, desc="train",
                                           disable=not show_progress, unit="step") as bar:
    last_time = time.perf_counter()
    while step < t.steps:
      batch = trainer.put_batch(next(train_it))
      state, metrics = trainer.train_step(state, batch, neg_log_freq)
      step += 1
      metrics = jax.device_get(metrics)
      if not np.isfinite(metrics["loss"]):
        raise NonFiniteLossError(
            f"non-finite loss ({metrics['loss']}) at step {step}; the last good checkpoint is "
            f"step {ckpt.latest_step()} in {ckpt.directory}")
      now = time.perf_counter()
      # Wall time between steps (the first includes compilation): tokens/s per device and,
      # where the device's peak is known, MFU.
      perf = throughput.step_throughput(tokens_per_step, now - last_time, flops_per_token,
                                        jax.device_count(), peak)
      postfix = {"loss": f"{metrics['loss']:.3f}", "H": f"{metrics['entropy']:.3f}",
                 "tok/s/dev": f"{perf['perf/tokens_per_s_per_device']:,.0f}"}
      if "perf/mfu" in perf:
        postfix["MFU"] = f"{perf['perf/mfu']:.1%}"
      bar.set_postfix(postfix)
      bar.update(1)
      last_time = now
      if step % t.log_every == 0 or step == t.steps:
        writer.write(step, {**metrics, "lr": lr_schedule(t)(step - 1), **perf})
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
          raise NonFiniteLossError(
              f"non-finite parameters after step {step}; not saved; the last good checkpoint is "
              f"step {ckpt.latest_step()} in {ckpt.directory}")
        ckpt.save(step, state, train_it.state.to_dict())
      if stop:
        status = "preempted"
        break
  return step, status, state


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
