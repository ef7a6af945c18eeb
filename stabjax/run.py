"""One training run, end to end: the loop around `train.Trainer` (SPEC sections 7 and 10).

`train_and_evaluate(cfg, workdir, dataset)` trains, evaluates, checkpoints and resumes.
Its workdir holds config.json, metrics.jsonl, TensorBoard events under tb/, checkpoints/,
and summary.json. A workdir with checkpoints resumes from the latest one; SIGTERM saves a
checkpoint and returns cleanly; a non-finite loss raises `NonFiniteLossError` before
anything bad is saved.

Several processes (`jax.distributed`): every process runs this same code and takes part
in every collective (train and eval steps, generation, orbax save and restore), feeding
its own rows of each batch; only process 0 writes config.json, metrics.jsonl,
resumes.jsonl, samples.txt, summary.json and the TensorBoard events, and only process 0
holds the workdir lock. The workdir may be a cloud path (gs://): every file goes through
`etils.epath`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
import typing
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from etils import epath
from jax.experimental import multihost_utils
from tensorboardX import SummaryWriter

from stabjax import degeneration, paths, sharding, throughput
from stabjax.checkpoint import Checkpointer, SigtermFlag
from stabjax.data import make_iterator
from stabjax.train import RunConfig, SpecialIds, Trainer


class NonFiniteLossError(RuntimeError):
  """The loss became NaN/inf; the last checkpoint on disk is the last good state."""


def config_to_dict(cfg: RunConfig) -> dict:
  return dataclasses.asdict(cfg)


def is_primary() -> bool:
  """Process 0: the one that writes the workdir's files when several processes run."""
  return jax.process_index() == 0


class MetricWriter:
  """metrics.jsonl (one JSON object per logged step) plus TensorBoard scalars.

  `rows` holds the run's history (kept rows of a resumed run, then every row written) in
  every process; only a writer with `write_files` (process 0) touches the files.
  TensorBoard events of a cloud workdir are written to a local folder and copied to
  WORKDIR/tb by `sync` (tensorboardX's own gs:// writer needs google-cloud-storage and
  re-uploads the whole file at every flush anyway).
  """

  def __init__(self, workdir, resume_step: int, write_files: bool = True):
    self.path = epath.Path(workdir) / "metrics.jsonl"
    # A resumed run replays the steps after its checkpoint: drop what it will log again.
    self.rows = [r for r in read_jsonl(self.path) if r["step"] <= resume_step]
    self._write_files = write_files
    self._tb = self._tb_local = None
    if not write_files:
      return
    # Rewritten through a temporary file: a full disk must not lose the kept rows.
    _write_file(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))
    self._tb_dir = epath.Path(workdir) / "tb"
    if not paths.is_local(self._tb_dir):
      self._tb_local = tempfile.mkdtemp(prefix="stabjax-tb-")
    self._tb = SummaryWriter(self._tb_local or os.fspath(self._tb_dir),
                             purge_step=resume_step + 1)

  def write(self, step: int, scalars: dict[str, Any]) -> None:
    row = {"step": step, **{k: _to_py(v) for k, v in scalars.items()}}
    self.rows.append(row)
    if not self._write_files:
      return
    _append_line(self.path, json.dumps(row))
    for k, v in row.items():
      if k != "step" and isinstance(v, (int, float)):
        self._tb.add_scalar(k, v, step)

  def write_texts(self, step: int, texts: dict[str, str]) -> None:
    """TensorBoard text (e.g. sample continuations); not in metrics.jsonl."""
    if self._tb is None:
      return
    for tag, text in texts.items():
      self._tb.add_text(tag, text, step)

  def sync(self) -> None:
    """Copy the local TensorBoard events of a cloud workdir to WORKDIR/tb."""
    if self._tb_local is None:
      return
    self._tb.flush()
    self._tb_dir.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(self._tb_local):
      with open(os.path.join(self._tb_local, name), "rb") as f:
        (self._tb_dir / name).write_bytes(f.read())

  def close(self) -> None:
    if self._tb is None:
      return
    self._tb.close()
    self.sync()
    if self._tb_local is not None:
      shutil.rmtree(self._tb_local, ignore_errors=True)


def read_jsonl(path) -> list[dict]:
  path = epath.Path(path)
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
             "train.lagged_metrics", "train.mesh")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for k, v in tree.items():
    out.update(_flatten(v, f"{prefix}.{k}" if prefix else k))
  return out


def with_new_defaults(old: dict, cls: type = RunConfig) -> dict:
  """A config.json dict with the settings it predates filled in at their defaults.

  A workdir written before a setting existed lacks its key; it trained with what is now
  that setting's default, so it compares equal to a config at the default (and differs
  from one that sets it otherwise)."""
  out = dict(old)
  hints = typing.get_type_hints(cls)
  for f in dataclasses.fields(cls):
    t = hints[f.name]
    if f.name in out:
      if dataclasses.is_dataclass(t) and isinstance(out[f.name], dict):
        out[f.name] = with_new_defaults(out[f.name], t)
    elif f.default is not dataclasses.MISSING:
      value = dataclasses.asdict(f.default) if dataclasses.is_dataclass(f.default) else f.default
      out[f.name] = json.loads(json.dumps(value))
  return out


def config_changes(old: dict, new: dict) -> tuple[dict[str, tuple], dict[str, list]]:
  """(refused, allowed) differences between two config.json dicts, as {dotted key: (old,
  new)}: allowed are those under `RESUMABLE`, refused every other (training) setting."""
  a, b = _flatten(with_new_defaults(old)), _flatten(new)
  diff = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
  resumable = lambda k: any(k == r or k.startswith(r + ".") for r in RESUMABLE)  # noqa: E731
  return ({k: v for k, v in diff.items() if not resumable(k)},
          {k: list(v) for k, v in diff.items() if resumable(k)})


class WorkdirLock:
  """An exclusive `flock` on WORKDIR/.lock while a run trains there.

  The kernel drops the lock when the process dies, so a killed run never leaves it stuck.
  flock needs a local or NFS file system: a cloud workdir (gs://) is not locked, as object
  stores have no lock that a dead process releases. With several processes only process
  0 takes it (`train_and_evaluate`): the others are the same run, not a second one.
  """

  def __init__(self, workdir):
    self.workdir = os.fspath(workdir)
    self._file = None

  def __enter__(self) -> "WorkdirLock":
    import fcntl
    if not paths.is_local(self.workdir):
      return self
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
    if self._file is None:
      return
    fcntl.flock(self._file, fcntl.LOCK_UN)
    self._file.close()


def _write_file(path, text: str) -> None:
  """Write `text` to `path` through a temporary file, so a full disk never leaves half a
  file; WorkdirError (one line) when it cannot be written."""
  path = epath.Path(path)
  tmp = path.with_name(path.name + ".tmp")
  try:
    tmp.write_text(text)
    tmp.replace(path)
  except OSError as e:
    raise WorkdirError(f"cannot write {path}: {e.strerror or e}; free disk space or fix "
                       f"permissions, then run the same command again") from None


def _append_line(path, line: str) -> None:
  path = epath.Path(path)
  try:
    if paths.is_local(path):
      with path.open("a") as f:
        f.write(line + "\n")
    else:  # object stores cannot append: rewrite the object
      old = path.read_text() if path.exists() else ""
      path.write_text(old + line + "\n")
  except OSError as e:
    raise WorkdirError(f"cannot write {path}: {e.strerror or e}") from None


def _agree(error: "WorkdirError | None") -> None:
  """Raise `error` in this process, and a WorkdirError in every other one, when any process
  failed a check: several processes must all stop, or all go on to the first collective."""
  if jax.process_count() == 1:
    if error is not None:
      raise error
    return
  failed = multihost_utils.process_allgather(np.int32(error is not None))
  if error is not None:
    raise error
  if np.any(failed):
    bad = [int(i) for i in np.flatnonzero(failed)]
    raise WorkdirError(f"process {bad[0]} of this run stopped (see its error); this process "
                       f"stops too")


def _close_quietly(ckpt: Checkpointer, writer: "MetricWriter | None") -> None:
  """Close after an error without raising a second one (the first says what happened)."""
  for close in (ckpt.close, writer.close if writer is not None else None):
    if close is not None:
      try:
        close()
      except Exception:  # noqa: BLE001
        pass


def train_and_evaluate(cfg: RunConfig, workdir: str, dataset, *, show_progress: bool = True,
                       logger=None, init_params: Any = None) -> dict[str, Any]:
  """Train (or resume) in `workdir`; returns the summary also written to summary.json.

  Guards (each a one-line error, nothing of the earlier run changed): `WorkdirError` when
  the workdir holds a run with other training settings (`config_changes`) or another live
  run holds its lock, or a file cannot be written; `CheckpointError` when no checkpoint
  restores or one cannot be written. A corrupt newest checkpoint is moved aside with a
  warning and the run resumes from the one before. `logger` (e.g.
  `logging_wandb.WandbLogger`) also gets the metrics and samples. `init_params` (the
  weights of `cfg.init_from`) replace the random init of a fresh run (`Trainer.create`).
  """
  cfg = resolve_feedback_target(cfg, dataset)
  config = json.loads(json.dumps(config_to_dict(cfg)))
  workdir = epath.Path(workdir)
  config_path = workdir / "config.json"
  allowed: dict[str, list] = {}
  primary = is_primary()
  # Every process reads config.json (process 0 replaces it atomically, and only after
  # its own check passed), so all of them refuse, or none.
  if config_path.exists():
    refused, allowed = config_changes(json.loads(config_path.read_text()), config)
    if refused:
      raise WorkdirError(
          f"{workdir} holds a run with other training settings ("
          + "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
          + "); resume it with its own flags or use another --workdir")
  lock, error = WorkdirLock(workdir), None
  if primary:
    try:
      workdir.mkdir(parents=True, exist_ok=True)
      lock.__enter__()
    except OSError as e:
      error = WorkdirError(f"cannot write to {workdir}: {e.strerror or e}; free disk space or "
                           f"fix permissions, then run the same command again")
    except WorkdirError as e:
      error = e
  try:
    _agree(error)
    if primary:
      _write_file(config_path, json.dumps(config, indent=2))
      if allowed:  # evaluation / logging settings changed on resume: keep a record
        _append_line(workdir / "resumes.jsonl", json.dumps(
            {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "changed": allowed}))
    return _train(cfg, workdir, dataset, show_progress, logger, init_params)
  finally:
    lock.__exit__(None, None, None)


def generation_params(params):
  """The parameters generation uses: as they are with one process; with several, a full
  copy on each process's first local device (an all-gather every process joins), since
  generation takes local prompts and returns host arrays (each process computes the same
  samples)."""
  if jax.process_count() == 1:
    return params
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("all",))
  gathered = jax.jit(lambda p: p, out_shardings=sharding.replicated(mesh))(params)
  return jax.tree.map(lambda x: x.addressable_data(0), gathered)


def _train(cfg: RunConfig, workdir: epath.Path, dataset, show_progress: bool, logger=None,
           init_params: Any = None) -> dict[str, Any]:
  t = cfg.train
  trainer = Trainer.create(cfg, special_ids(dataset.tokenizer), init_params=init_params)
  ckpt = Checkpointer(workdir / "checkpoints", keep=t.keep_checkpoints)
  iterator_kw = dict(process_index=jax.process_index(), process_count=jax.process_count())
  writer = None
  primary = is_primary()
  try:
    start, state, data_state = ckpt.restore_latest_intact(
        trainer.abstract_state, trainer.state_shardings,
        warn=lambda m: print(m, file=sys.stderr))
    if start is None:
      state, start = trainer.init_state(), 0
    train_it = make_iterator(dataset, "train", t.batch_size, t.seed, state=data_state,
                             **iterator_kw)
    writer = MetricWriter(workdir, resume_step=start, write_files=primary)
    if logger is not None:
      writer = logger.attach(writer, str(workdir), config_to_dict(cfg))
    step, status, state = _loop(cfg, trainer, dataset, ckpt, writer, state, train_it, start,
                                show_progress)
  except BaseException:
    _close_quietly(ckpt, writer)
    raise
  ckpt.close()
  writer.close()

  summary = {"status": status, "step": step, "workdir": str(paths.absolute(workdir)),
             "history": writer.rows}
  texts = None
  if status == "finished":
    summary.update(final_summary(summary["history"]))
    gen_metrics, texts = degeneration.measure(trainer.model, generation_params(state.params),
                                              dataset, cfg.generation)
    summary["generation"] = gen_metrics
    if primary:
      _write_file(workdir / "samples.txt", degeneration.format_samples(texts))
      _write_file(workdir / "summary.json", json.dumps(summary, indent=2))
  if logger is not None:
    logger.finish(summary, texts)
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
  # One progress bar, process 0's.
  show_progress = show_progress and is_primary()
  # With several processes a SIGTERM reaches each at a different step: only orbax's
  # preemption notice (jax.distributed's sync manager, which catches SIGTERM itself) stops
  # them all at the same step.
  sigterm_flag = SigtermFlag() if jax.process_count() == 1 else contextlib.nullcontext(False)
  with sigterm_flag as sigterm, tqdm.tqdm(total=t.steps, initial=start, desc="train",
                                           disable=not show_progress, unit="step") as bar:
    last_time = time.perf_counter()
    pending = []  # with t.lagged_metrics: the last step's (step, metrics), not yet read

    def record(done_step, metrics):
      nonlocal last_time
      metrics = jax.device_get(metrics)
      if not np.isfinite(metrics["loss"]):
        raise NonFiniteLossError(
            f"non-finite loss ({metrics['loss']}) at step {done_step}; the last good checkpoint "
            f"is step {ckpt.latest_step()} in {ckpt.directory}")
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
      if done_step % t.log_every == 0 or done_step == t.steps:
        writer.write(done_step, {**metrics, **perf})

    def flush():
      while pending:
        record(*pending.pop())

    while step < t.steps:
      batch = trainer.put_batch(next(train_it))
      state, metrics = trainer.train_step(state, batch, neg_log_freq)
      step += 1
      # Lagged: this step's metrics are read after the next step is dispatched, so the
      # host never waits for the device between steps.
      flush()
      pending.append((step, metrics))
      if not t.lagged_metrics:
        flush()
      if step % t.eval_every == 0 or step == t.steps:
        flush()  # metrics rows in step order
        row = evaluate(trainer, state.params, dataset, cfg)
        if cfg.generation.eval_gen_prompts:
          gen, shown = evaluate_generation(trainer, generation_params(state.params), dataset,
                                           cfg)
          row.update(gen)
          writer.write_texts(step, shown)
        writer.write(step, row)
      stop = bool(sigterm) or ckpt.reached_preemption(step)
      if step % t.checkpoint_every == 0 or step == t.steps or stop:
        flush()  # every saved step's loss checked first
        if not _all_finite(state.params):
          raise NonFiniteLossError(
              f"non-finite parameters after step {step}; not saved; the last good checkpoint is "
              f"step {ckpt.latest_step()} in {ckpt.directory}")
        ckpt.save(step, state, train_it.state.to_dict())
        writer.sync()
      if stop:
        status = "preempted"
        break
    flush()
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
