"""Optional Weights & Biases logging of a run: `pip install -e ".[wandb]"`, `--wandb_project`.

`WandbLogger(project, entity)` is handed to `run.train_and_evaluate(..., logger=...)`.
It mirrors what the run writes to metrics.jsonl (every numeric scalar, at its step) and
its sample continuations (the in-training ones and, at the end, every decoder's) into one
wandb run, from process 0 only; other processes log nothing. The wandb run's id is kept in
WORKDIR/wandb_id, so a resumed run continues the same wandb run (`resume="allow"`); the
steps a resumed run replays from its checkpoint are already in wandb, which keeps the
first values it got.

wandb is imported by `import_wandb`, called only when a logger is made: without
`--wandb_project` it is never imported.
"""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
from etils import epath

from stabjax import paths

ID_FILE = "wandb_id"


class WandbError(RuntimeError):
  """wandb was asked for but cannot be used; `str(e)` is one line saying what to do."""


def import_wandb():
  try:
    import wandb
  except ImportError:
    raise WandbError("--wandb_project needs wandb: pip install -e '.[wandb]'") from None
  return wandb


def run_id(workdir: str) -> str:
  """The wandb run id stored in WORKDIR/wandb_id, made (and stored) on the first call."""
  path = epath.Path(workdir) / ID_FILE  # a gs:// workdir too
  if path.exists():
    stored = path.read_text().strip()
    if stored:
      return stored
  new = uuid.uuid4().hex[:12]
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_text(new + "\n")
  tmp.rename(path)
  return new


def _scalars(values: dict[str, Any]) -> dict[str, float]:
  out = {}
  for k, v in values.items():
    a = np.asarray(v)
    if a.size == 1 and np.issubdtype(a.dtype, np.number):
      out[k] = a.item()
  return out


class _Mirror:
  """The run's metric writer, with every write also logged to the wandb run."""

  def __init__(self, writer, wandb, run):
    self._writer, self._wandb, self._run = writer, wandb, run

  def __getattr__(self, name):  # path, and whatever else the run reads from its writer
    return getattr(self._writer, name)

  def write(self, step: int, scalars: dict[str, Any]) -> None:
    self._writer.write(step, scalars)
    self._run.log(_scalars(scalars), step=step)

  def write_texts(self, step: int, texts: dict[str, str]) -> None:
    self._writer.write_texts(step, texts)
    table = self._wandb.Table(columns=["tag", "text"], data=[[k, v] for k, v in texts.items()])
    self._run.log({"samples": table}, step=step)

  def close(self) -> None:
    self._writer.close()


class WandbLogger:
  """One wandb run per training run (see the module docstring)."""

  def __init__(self, project: str, entity: str | None = None,
               process_index: int | None = None):
    self.project, self.entity = project, entity
    self._process_index = process_index
    self._wandb = import_wandb()  # fails here, before training, when it is missing
    self._run = None

  def _is_main(self) -> bool:
    if self._process_index is None:
      import jax
      return jax.process_index() == 0
    return self._process_index == 0

  def attach(self, writer, workdir: str, config: dict):
    """Starts (or resumes) the wandb run of `workdir`; returns the writer to use."""
    if not self._is_main():
      return writer
    self._run = self._wandb.init(project=self.project, entity=self.entity,
                                 id=run_id(workdir), resume="allow",
                                 name=paths.absolute(workdir).name,
                                 dir=workdir, config=config)
    return _Mirror(writer, self._wandb, self._run)

  def finish(self, summary: dict, texts: dict | None) -> None:
    """The end-of-run generation metrics and samples (when the run finished), then closes
    the wandb run."""
    if self._run is None:
      return
    step = summary.get("step")
    gen = {f"generation/{decoder}/{k}": v for decoder, metrics in
           summary.get("generation", {}).items() for k, v in metrics.items()}
    if gen:
      self._run.log(_scalars(gen), step=step)
    if texts:
      prompts = texts.get("prompts", [])
      rows = [[decoder, p, c] for decoder, outs in texts.items() if decoder != "prompts"
              for p, c in zip(prompts, outs)]
      self._run.log({"final_samples": self._wandb.Table(
          columns=["decoder", "prompt", "continuation"], data=rows)}, step=step)
    self._run.finish()
    self._run = None
