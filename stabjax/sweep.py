"""Sweeps of runs: one `train_and_evaluate` per condition, and a run's headline record.

The launchers (experiments/table1.py, ablation.py, trajectory.py, scale.py) share this so
that none copies another. It holds no flags and no plotting: a sweep is reusable from a
notebook or a test, and a finished run is never trained twice.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

# ------------------------------------------------------------------------------ sweeps


@dataclasses.dataclass(frozen=True)
class SweepRun:
  """One condition of a sweep: its run directory name, its config, and its labels."""

  name: str  # subdirectory of the sweep workdir
  cfg: Any  # stabjax.train.RunConfig
  labels: Mapping[str, Any]  # e.g. {"model": ..., "seed": ..., "alpha": ..., "variant": ...}


def run_name(model: str, seed: int, alpha: float, variant: str = "full") -> str:
  """`<model>_s<seed>_a<alpha>` (+ `_<variant>` unless 'full'): one run's directory."""
  name = f"{model}_s{seed}_a{alpha:g}"
  return name if variant == "full" else f"{name}_{variant}"


def override_config(cfg: Any, *, model: str | None = None, seed: int | None = None,
                    alpha: float | None = None, dmu: bool | None = None,
                    dtu: bool | None = None, psu_c_tilde_from: str | None = None,
                    feedback: str | None = None, feedback_target: float | None = None,
                    data_spec: str | None = None) -> Any:
  """`cfg` (a RunConfig) for one condition of a sweep.

  `model` swaps the shape (layers, widths, vocabulary, positions) for the named size and
  keeps the numerics and the DMU/DTU settings; `seed` sets the run seed and the
  generation seed; `dmu` / `dtu` switch a unit on or off (the Figure 2 ablation), and
  `psu_c_tilde_from` says whose c~ the PSU uses (`PSUConfig.c_tilde_from`); `feedback` /
  `feedback_target` replace `TrainConfig.feedback` / `.feedback_target` (together, so one
  call can switch to the 'data' form and give its setpoint); `data_spec` replaces the
  `--data` value (ValueError if it is not one).
  """
  from stabjax import configs

  m = cfg.model
  if model is not None:
    shape = configs.get_model_config(model)
    m = dataclasses.replace(shape, dtype=m.dtype, remat=m.remat, scan_layers=m.scan_layers,
                            dropout_rate=m.dropout_rate, dmu=m.dmu, dtu=m.dtu)
  if dmu is not None:
    m = m.replace(dmu=dataclasses.replace(m.dmu, enabled=dmu))
  if dtu is not None:
    m = m.replace(dtu=dataclasses.replace(m.dtu, enabled=dtu))
  train, gen = cfg.train, cfg.generation
  if seed is not None:
    train = dataclasses.replace(train, seed=seed)
    gen = dataclasses.replace(gen, seed=seed)
  if alpha is not None:
    train = dataclasses.replace(train, alpha=alpha)
  fb = {k: v for k, v in (("feedback", feedback), ("feedback_target", feedback_target))
        if v is not None}
  if fb:
    train = dataclasses.replace(train, **fb)
  psu = cfg.psu
  if psu_c_tilde_from is not None:
    psu = dataclasses.replace(psu, c_tilde_from=psu_c_tilde_from)
  data = cfg.data if data_spec is None else dataclasses.replace(cfg.data, spec=data_spec)
  return dataclasses.replace(cfg, model=m, train=train, generation=gen, psu=psu, data=data)


def _jsonable(obj: Any) -> Any:
  return json.loads(json.dumps(obj))


def read_summary(run_dir: str) -> dict | None:
  """The finished run's summary.json, or None if the run has not finished."""
  path = os.path.join(run_dir, "summary.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    summary = json.load(f)
  return summary if summary.get("status") == "finished" else None


def _dataset_key(data_cfg: Any, seed: int) -> str:
  d = dataclasses.asdict(data_cfg)
  # Only synthetic data without its own seed depends on the run seed (data.load_dataset).
  if str(d.get("spec", "")).startswith("synthetic") and d.get("synthetic_seed") is None:
    d["synthetic_seed"] = seed
  return json.dumps(d, sort_keys=True, default=str)


def run_sweep(runs: Sequence[SweepRun], workdir: str, *,
              load_dataset: Callable[..., Any] | None = None,
              train: Callable[..., dict] | None = None,
              show_progress: bool = False,
              reuse_from: Sequence[str] = (),
              log: Callable[[str], None] = print) -> list[dict]:
  """Runs (or reuses) every condition in `workdir/<name>/`; returns their summaries.

  A run whose summary.json says 'finished' is reused as is; any other run goes through
  `train` (default `stabjax.run.train_and_evaluate`), which resumes from the run's latest
  checkpoint. Datasets are loaded once per distinct data config. The model's vocabulary
  is set to the tokenizer's, as `experiments/common.prepare_run` does. A run directory
  whose config.json differs from the requested config raises ValueError rather than
  mixing two conditions under one name. A run that ends 'preempted' stops the sweep
  (the summaries so far are returned; run the same command again to continue).
  `reuse_from` lists other sweep directories whose finished run of the same name and
  the same config is reused instead of training it again (e.g. the ablation's 'full'
  variant is a Table 1 run).
  """
  if load_dataset is None:
    from stabjax.data import load_dataset
  if train is None:
    from stabjax.run import train_and_evaluate as train
  from stabjax.run import config_to_dict

  datasets: dict[str, Any] = {}
  summaries = []
  for i, r in enumerate(runs):
    run_dir = os.path.join(workdir, r.name)
    cfg = r.cfg
    key = _dataset_key(cfg.data, cfg.train.seed)
    summary = read_summary(run_dir)
    if summary is None:
      for other in reuse_from:
        other_dir = os.path.join(other, r.name)
        found = read_summary(other_dir)
        if found is not None and _same_config(other_dir, config_to_dict, cfg):
          run_dir, summary = other_dir, found
          break
    if summary is None:
      if key not in datasets:
        datasets[key] = load_dataset(cfg.data, seed=cfg.train.seed)
      dataset = datasets[key]
      cfg = dataclasses.replace(cfg, model=cfg.model.replace(
          vocab_size=dataset.tokenizer.vocab_size))
    _check_config(run_dir, config_to_dict, cfg, summary is not None)
    if summary is not None:
      log(f"[{i + 1}/{len(runs)}] {r.name}: reused {run_dir}/summary.json")
    else:
      log(f"[{i + 1}/{len(runs)}] {r.name}: training in {run_dir}")
      summary = train(cfg, run_dir, dataset, show_progress=show_progress)
      if summary["status"] != "finished":
        log(f"{r.name} ended '{summary['status']}' at step {summary['step']}; run the same "
            f"command again to resume")
        summaries.append(summary)
        break
    summaries.append(summary)
  return summaries


def _configs(run_dir: str, to_dict, cfg, ignore_vocab: bool) -> tuple[dict | None, dict]:
  path = os.path.join(run_dir, "config.json")
  new = _jsonable(to_dict(cfg))
  if not os.path.exists(path):
    return None, new
  from stabjax.run import with_new_defaults
  with open(path) as f:
    old = with_new_defaults(json.load(f))
  if ignore_vocab:
    # The tokenizer's vocabulary is only known after loading the data; compare the rest.
    old = {**old, "model": {**old["model"], "vocab_size": None}}
    new = {**new, "model": {**new["model"], "vocab_size": None}}
  if isinstance(new.get("train"), dict) and new["train"].get("feedback_target") is None:
    # A requested None is resolved from the data at run time and written to config.json.
    new = {**new, "train": {**new["train"],
                            "feedback_target": old.get("train", {}).get("feedback_target")}}
  return old, new


def _same_config(run_dir: str, to_dict, cfg) -> bool:
  old, new = _configs(run_dir, to_dict, cfg, ignore_vocab=True)
  return old == new


def _check_config(run_dir: str, to_dict, cfg, reused: bool) -> None:
  old, new = _configs(run_dir, to_dict, cfg, ignore_vocab=reused)
  if old is None:
    return
  if old != new:
    diff = sorted(f"{sec}.{k}" for sec in new if isinstance(new[sec], dict)
                  for k in new[sec] if old.get(sec, {}).get(k) != new[sec][k])
    raise ValueError(f"{run_dir} holds a run with another config (differs in "
                     f"{', '.join(diff) or 'structure'}); use another --workdir")


# ------------------------------------------------------------------------------ records

# The headline metrics of a run, in table order: (record key, column title).
# The decoder whose metrics are the unprefixed headline columns; the others' HF
# proportions have columns of their own (decoding is a measured axis, SPEC 9).
HEADLINE_DECODER = "sample"
DECODER_TITLES = {"sample": "sampling", "greedy": "greedy", "top_k": "top-k 40",
                  "nucleus": "nucleus 0.9"}


def decoder_key(decoder: str, metric: str) -> str:
  """The record key of `metric` under `decoder` (see `run_record`)."""
  return metric if decoder == HEADLINE_DECODER else f"{decoder}/{metric}"


HEADLINE_METRICS: tuple[tuple[str, str], ...] = (
    ("hf_proportion", "HF prop. (sampling)"),
    ("greedy/hf_proportion", "HF prop. (greedy)"),
    ("top_k/hf_proportion", "HF prop. (top-k 40)"),
    ("nucleus/hf_proportion", "HF prop. (nucleus 0.9)"),
    ("hf_proportion_reference", "HF prop. (held-out ref.)"),
    ("generative_entropy", "gen. entropy (nats)"),
    ("effective_rank", "eff. rank"),
    ("val_ppl", "val ppl"),
    ("seq_rep_4", "seq-rep-4"),
    ("distinct_2", "distinct-2"),
    ("no_eos_share", "no-EOS share"),
    ("train_loss", "train loss"),
    ("train_entropy", "train H(B_t) (nats)"),
    ("psu_multiplier", "PSU update multiplier (mean)"),
)
SYNTHETIC_METRICS: tuple[tuple[str, str], ...] = (
    ("syn/support_mass", "P(S_0)"),
    ("syn/forward_kl", "KL(P_emp ‖ P) (nats)"),
    ("syn/model_entropy", "H(P) (nats)"),
)


def run_wall_time(run_dir: str) -> float | None:
  """Seconds from the run's start (config.json) to its end (summary.json), from mtimes.

  A resumed run rewrites config.json, so this is the wall time of its last session.
  """
  try:
    return (os.path.getmtime(os.path.join(run_dir, "summary.json"))
            - os.path.getmtime(os.path.join(run_dir, "config.json")))
  except OSError:
    return None


def run_record(labels: Mapping[str, Any], summary: Mapping[str, Any]) -> dict[str, Any]:
  """Labels plus the run's headline metrics: final train/eval values, the PSU's mean
  update multiplier, the generation metrics of the headline decoder (`HEADLINE_DECODER`,
  unprefixed), of the other decoders as '<decoder>/<metric>', and the synthetic-language
  quantities as 'syn/<metric>'."""
  final, gen = summary.get("final", {}), summary.get("generation", {})
  rec = dict(labels)
  if summary.get("workdir"):
    rec["wall_s"] = run_wall_time(summary["workdir"])
  rec["train_loss"] = final.get("loss")
  rec["train_entropy"] = final.get("entropy")
  rec["val_loss"] = final.get("val_loss")
  rec["val_ppl"] = final.get("val_ppl")
  rec["psu_multiplier"] = summary.get("psu", {}).get("multiplier_mean")
  number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
  for group, metrics in gen.items():
    prefix = {HEADLINE_DECODER: "", "synthetic": "syn/"}.get(group, f"{group}/")
    rec.update({prefix + k: v for k, v in metrics.items() if number(v)})
  return rec



def sample_words(run_dir: str, decoder: str = HEADLINE_DECODER) -> list[str]:
  """The words (SPEC 9) of a run's generations under `decoder` (from its samples.txt)."""
  from stabjax.words import words

  return [w for text in read_samples(run_dir).get(decoder, []) for w in words(text)]


def read_samples(run_dir: str) -> dict[str, list[str]]:
  """A run's samples.txt parsed ({section: texts}: decoders and 'prompts'); {} if absent."""
  from stabjax.degeneration import parse_samples

  path = os.path.join(run_dir, "samples.txt")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return parse_samples(f.read())


def count_params(model_cfg: Any) -> int:
  """Parameters of the model `model_cfg` describes (shapes only, nothing allocated)."""
  from stabjax.models import count_params as count

  return count(model_cfg)


def run_param_count(summary: Mapping[str, Any], model_cfg: Any) -> int:
  """A finished run's parameter count: the summary's `num_params` if it has one, else
  `count_params` of `model_cfg` at the vocabulary the run used (its config.json)."""
  if isinstance(summary.get("num_params"), int):
    return summary["num_params"]
  vocab = model_cfg.vocab_size
  path = os.path.join(summary.get("workdir") or "", "config.json")
  if os.path.exists(path):
    with open(path) as f:
      vocab = json.load(f).get("model", {}).get("vocab_size", vocab)
  return count_params(model_cfg.replace(vocab_size=vocab))


def metric_columns(records: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
  """Headline metrics, plus the synthetic-language ones when any record has them.

  (GPT-2 runs on `synthetic` data have them; BERT runs, which define no sequence
  probability, do not: their cells stay empty.)
  """
  cols = list(HEADLINE_METRICS)
  if any(k in r for r in records for k, _ in SYNTHETIC_METRICS):
    cols += list(SYNTHETIC_METRICS)
  return cols



def parse_grid(models: Sequence[str], seeds: Sequence[str], alphas: Sequence[str]
               ) -> tuple[list[str], list[int], list[float]]:
  """The string lists of a sweep's flags -> (models, seeds, alphas); ValueError if invalid."""
  from stabjax.configs import MODEL_CONFIGS

  for m in models:
    if m not in MODEL_CONFIGS:
      raise ValueError(f"--models contains {m!r}; accepted: {', '.join(MODEL_CONFIGS)}")
  try:
    seed_list = [int(s) for s in seeds]
  except ValueError:
    raise ValueError(f"--seeds={','.join(seeds)} is not accepted; accepted: integers") from None
  try:
    alpha_list = [float(a) for a in alphas]
  except ValueError:
    raise ValueError(f"--alphas={','.join(alphas)} is not accepted; accepted: numbers >= 0"
                     ) from None
  if not (models and seed_list and alpha_list) or any(
      not math.isfinite(a) or a < 0 for a in alpha_list):
    raise ValueError("--models, --seeds and --alphas need at least one value each; "
                     "accepted alphas: numbers >= 0")
  return list(models), seed_list, alpha_list
