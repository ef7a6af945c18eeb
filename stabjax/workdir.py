"""Rebuild a finished (or running) run from its workdir: config, data, params of a step.

What experiments/sample.py, evaluate.py and export.py share: `load_config` turns
WORKDIR/config.json back into the `RunConfig` that trained it, `load_run_dataset` loads
its data with its own tokenizer (SentencePiece from the cache, or the HF tokenizer of
`init_from`), and `restore_params` reads the parameters of one checkpoint step. Every
problem with the workdir raises `run.WorkdirError` with one line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from typing import Any

from stabjax.run import WorkdirError, special_ids
from stabjax.train import RunConfig, Trainer


def _from_dict(cls, data: dict, where: str):
  """A (nested) frozen dataclass from its `dataclasses.asdict` JSON; lists -> tuples."""
  hints = typing.get_type_hints(cls)
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(data) - names)
  if unknown:
    raise WorkdirError(f"{where}: settings unknown to this version of stabjax: "
                       f"{', '.join(unknown)}")
  kw = {}
  for name, value in data.items():
    t = hints[name]
    if dataclasses.is_dataclass(t) and isinstance(value, dict):
      value = _from_dict(t, value, f"{where}.{name}")
    elif isinstance(value, list):
      value = tuple(value)
    kw[name] = value
  try:
    return cls(**kw)
  except (TypeError, ValueError) as e:
    raise WorkdirError(f"{where}: {e}") from None


def config_from_dict(data: dict) -> RunConfig:
  """The inverse of `run.config_to_dict` (after a JSON round trip)."""
  return _from_dict(RunConfig, data, "config.json")


def load_config(workdir: str) -> RunConfig:
  """WORKDIR/config.json as the RunConfig that wrote it; WorkdirError (one line) when the
  workdir or its config.json is missing or unreadable."""
  if not os.path.isdir(workdir):
    raise WorkdirError(f"{workdir}: no such workdir")
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise WorkdirError(f"{workdir} holds no run (no config.json); pass the --workdir of a "
                       f"training run")
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise WorkdirError(f"cannot read {path}: {e}") from None
  return config_from_dict(data)


def load_tokenizer(cfg: RunConfig):
  """The HF tokenizer of `cfg.init_from`, or None (the data's own tokenizer)."""
  if cfg.init_from is None:
    return None
  from stabjax.data.tokenizer import HFTokenizer
  return HFTokenizer(cfg.init_from, model_vocab_size=cfg.model.vocab_size,
                     model_type=cfg.model.arch)


def run_tokenizer(cfg: RunConfig):
  """The run's tokenizer without loading its data where it can: the HF tokenizer of
  `init_from`, the synthetic language's word tokenizer, else (text/tfds) the
  SentencePiece model of the dataset cache."""
  tok = load_tokenizer(cfg)
  if tok is not None:
    return tok
  if cfg.data.data_spec.kind == "synthetic":
    from stabjax.data.tokenizer import PseudoWordTokenizer
    return PseudoWordTokenizer(cfg.data.synthetic_vocab_size)
  return load_run_dataset(cfg).tokenizer


def load_run_dataset(cfg: RunConfig):
  """The run's dataset, tokenized as in training (DataError / ValueError on a problem)."""
  from stabjax.data import load_dataset
  return load_dataset(cfg.data, seed=cfg.train.seed, tokenizer=load_tokenizer(cfg))


def checkpoint_steps(workdir: str) -> list[int]:
  """The steps with a checkpoint in WORKDIR/checkpoints (nothing is created)."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  from stabjax.checkpoint import Checkpointer
  ckpt = Checkpointer(directory)
  try:
    return ckpt.all_steps()
  finally:
    ckpt.close()


def restore_params(workdir: str, cfg: RunConfig, tokenizer, step: int | None = None
                   ) -> tuple[int, Trainer, Any]:
  """(step, trainer, params) of checkpoint `step` (None: the latest) of the run in
  `workdir`, restored with the run's own shardings; WorkdirError (one line) when there
  is no checkpoint or not that step (the message lists the available steps)."""
  steps = checkpoint_steps(workdir)
  if not steps:
    raise WorkdirError(f"{workdir} has no checkpoint (checkpoints/ is empty or missing)")
  if step is None:
    step = steps[-1]
  if step not in steps:
    raise WorkdirError(f"{workdir} has no checkpoint of step {step}; available steps: "
                       f"{', '.join(map(str, steps))}")
  from stabjax.checkpoint import Checkpointer
  trainer = Trainer.create(cfg, special_ids(tokenizer))
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    state, _ = ckpt.restore(step, trainer.abstract_state, trainer.state_shardings)
  except Exception as e:  # orbax raises many types for a damaged checkpoint
    raise WorkdirError(f"checkpoint step {step} in {workdir} does not restore "
                       f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})"
                       ) from None
  finally:
    ckpt.close()
  return step, trainer, state.params
