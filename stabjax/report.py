"""Sweeps of runs, and the tables and plots the experiments write (SPEC section 10).

The experiments (paper section 6: Table 1, Figure 2, Figure 3) share three things kept
here so that none copies another: `run_sweep` (one `train_and_evaluate` per condition,
reused when its summary.json exists, resumed from its checkpoint when interrupted), the
flattening of a run summary into one record of headline metrics (`run_record`), and the
writers: markdown / CSV / JSON tables and matplotlib PNGs (Agg backend, labelled axes).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from stabjax.metrics.aggregate import cross_seed_summary

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
                    dtu: bool | None = None, psu_c_tilde_from: str | None = None) -> Any:
  """`cfg` (a RunConfig) for one condition of a sweep.

  `model` swaps the shape (layers, widths, vocabulary, positions) for the named size and
  keeps the numerics and the DMU/DTU settings; `seed` sets the run seed and the
  generation seed; `dmu` / `dtu` switch a unit on or off (the Figure 2 ablation), and
  `psu_c_tilde_from` says whose c~ the PSU uses (`PSUConfig.c_tilde_from`).
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
  psu = cfg.psu
  if psu_c_tilde_from is not None:
    psu = dataclasses.replace(psu, c_tilde_from=psu_c_tilde_from)
  return dataclasses.replace(cfg, model=m, train=train, generation=gen, psu=psu)


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
  with open(path) as f:
    old = json.load(f)
  if ignore_vocab:
    # The tokenizer's vocabulary is only known after loading the data; compare the rest.
    old = {**old, "model": {**old["model"], "vocab_size": None}}
    new = {**new, "model": {**new["model"], "vocab_size": None}}
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


def wall_time_note(records: Sequence[Mapping[str, Any]], elapsed_s: float) -> str:
  """'runs took X min in all (...); this invocation Y min' for a sweep's markdown."""
  walls = [r["wall_s"] for r in records if r.get("wall_s") is not None]
  return (f"the runs took {sum(walls) / 60:.1f} min of wall time in all (each from its "
          f"config.json to its summary.json; a resumed run counts its last session only); "
          f"this invocation took {elapsed_s / 60:.1f} min (reused runs cost nothing).")


def sample_words(run_dir: str, decoder: str = HEADLINE_DECODER) -> list[str]:
  """The words (SPEC 9) of a run's generations under `decoder` (from its samples.txt)."""
  from stabjax.degeneration import parse_samples
  from stabjax.words import words

  path = os.path.join(run_dir, "samples.txt")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [w for text in parse_samples(f.read()).get(decoder, []) for w in words(text)]


def metric_columns(records: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
  """Headline metrics, plus the synthetic-language ones when any record has them.

  (GPT-2 runs on `synthetic` data have them; BERT runs, which define no sequence
  probability, do not: their cells stay empty.)
  """
  cols = list(HEADLINE_METRICS)
  if any(k in r for r in records for k, _ in SYNTHETIC_METRICS):
    cols += list(SYNTHETIC_METRICS)
  return cols


def group_by(records: Sequence[Mapping[str, Any]], keys: Sequence[str]
             ) -> dict[tuple, list[Mapping[str, Any]]]:
  """Records grouped by the values of `keys`, groups in first-seen order."""
  out: dict[tuple, list] = collections.OrderedDict()
  for r in records:
    out.setdefault(tuple(r[k] for k in keys), []).append(r)
  return out


def seed_aggregate(records: Sequence[Mapping[str, Any]], keys: Sequence[str],
                   metrics: Sequence[str]) -> list[dict[str, Any]]:
  """Per group of `keys`: n and (mean, std over seeds, ddof=1) of each metric present."""
  out = []
  for group, recs in group_by(records, keys).items():
    stats = cross_seed_summary([{m: r[m] for m in metrics if r.get(m) is not None}
                                for r in recs])
    out.append({**dict(zip(keys, group)), "n": len(recs), **stats})
  return out


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


def convergence_steps(histories: Mapping[str, Sequence[Mapping[str, Any]]], key: str = "loss",
                      tail: int = 3) -> tuple[float, dict[str, float | None]]:
  """The step at which each run first reaches the level that every run ends at.

  The common threshold is the largest, over runs, of the mean of the last `tail` logged
  values of `key`; each run's step is `aggregate.convergence_step(..., 'below')`. This is
  our reading of the paper's "the baseline converges 24% faster" (section 6.3).
  """
  from stabjax.metrics.aggregate import convergence_step

  series = {name: [(r["step"], r[key]) for r in h if key in r] for name, h in histories.items()}
  threshold = max(float(np.mean([v for _, v in s[-tail:]])) for s in series.values())
  return threshold, {name: convergence_step([st for st, _ in s], [v for _, v in s], threshold)
                     for name, s in series.items()}


def split_slopes(loss: Sequence[float], entropy: Sequence[float]
                 ) -> dict[str, float]:
  """Least-squares slope dH/dloss above and below the median loss (Figure 3's claim).

  The paper (section 6.4): at high loss the entropy falls steeply with the loss, at low
  loss the relation flattens. Returns {'median_loss', 'slope_high_loss', 'slope_low_loss'}.
  """
  x, y = np.asarray(loss, float), np.asarray(entropy, float)
  med = float(np.median(x))
  out = {"median_loss": med}
  for name, sel in (("slope_high_loss", x >= med), ("slope_low_loss", x < med)):
    xs, ys = x[sel], y[sel]
    out[name] = float(np.polyfit(xs, ys, 1)[0]) if xs.size >= 2 and np.ptp(xs) > 0 else math.nan
  return out


# ------------------------------------------------------------------------------ formatting


def fmt(v: Any, digits: int = 4) -> str:
  """Numbers with `digits` significant digits; None/nan as an em dash."""
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return "—"
  if isinstance(v, bool) or isinstance(v, (int, np.integer)):
    return str(v)
  if isinstance(v, (float, np.floating)):
    return f"{float(v):.{digits}g}"
  return str(v)


def fmt_percent(v: float | None, digits: int = 1) -> str:
  """A share in [0, 1] as a percentage with `digits` decimals, as in the paper's Table 1."""
  if v is None or math.isnan(v):
    return "—"
  return f"{100.0 * v:.{digits}f}%"


def fmt_mean_std(stat: tuple[float, float] | None, digits: int = 4, percent: bool = False) -> str:
  """'mean ± std' (std omitted when nan, i.e. a single seed)."""
  if stat is None:
    return "—"
  mean, std = stat
  f = (lambda x: fmt_percent(x)) if percent else (lambda x: fmt(x, digits))
  return f(mean) if math.isnan(std) else f"{f(mean)} ± {f(std)}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A GitHub markdown table; cells that are not strings go through `fmt`; '|' is escaped."""
  cell = lambda c: (c if isinstance(c, str) else fmt(c)).replace("|", "\\|")  # noqa: E731
  lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
  for row in rows:
    if len(row) != len(header):
      raise ValueError(f"row has {len(row)} cells, header {len(header)}")
    lines.append("| " + " | ".join(cell(c) for c in row) + " |")
  return "\n".join(lines)


def write_csv(path: str, records: Sequence[Mapping[str, Any]],
              columns: Sequence[str] | None = None) -> None:
  """One row per record; `columns` default to the union of keys in first-seen order."""
  if columns is None:
    columns = list(dict.fromkeys(k for r in records for k in r))
  with open(path, "w", newline="") as f:
    w = csv.writer(f, lineterminator="\n")
    w.writerow(columns)
    for r in records:
      w.writerow(["" if r.get(c) is None else repr(r[c]) if isinstance(r[c], float) else r[c]
                  for c in columns])


def write_json(path: str, obj: Any) -> None:
  """Pretty JSON; tuples become lists and nan becomes null (strict JSON)."""
  def clean(x):
    if isinstance(x, Mapping):
      return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
      return [clean(v) for v in x]
    if isinstance(x, (float, np.floating)):
      return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
      return int(x)
    return x
  with open(path, "w") as f:
    json.dump(clean(obj), f, indent=2, allow_nan=False)
    f.write("\n")


# ------------------------------------------------------------------------------ plots


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def plot_lines(path: str, x: Sequence[float], series: Mapping[str, tuple[Sequence[float],
               Sequence[float] | None]], *, xlabel: str, ylabel: str, title: str = "",
               figsize: tuple[float, float] = (5.0, 3.5), dpi: int = 100,
               percent: bool = False) -> None:
  """One line per series (label -> (means, stds or None)) with error bars, as a PNG."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=figsize, dpi=dpi)
  scale = 100.0 if percent else 1.0
  for label, (mean, std) in series.items():
    m = scale * np.asarray(mean, float)
    if std is None:  # a reference level, not a measured series
      ax.plot(np.asarray(x, float), m, linestyle="--", color="gray", label=label)
      continue
    s = scale * np.nan_to_num(np.asarray(std, float))
    ax.errorbar(np.asarray(x, float), m, yerr=s, marker="o", capsize=3, label=label)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if title:
    ax.set_title(title, fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=dpi)
  plt.close(fig)


def plot_grouped_bars(path: str, groups: Sequence[str], panels: Sequence[tuple[str, Mapping[
                      str, tuple[Sequence[float], Sequence[float] | None]]]], *, xlabel: str,
                      title: str = "", figsize: tuple[float, float] = (9.0, 3.5),
                      dpi: int = 100) -> None:
  """Side-by-side panels of grouped bars: panel = (ylabel, {series: (values, stds)})."""
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(panels), figsize=figsize, dpi=dpi, squeeze=False)
  x = np.arange(len(groups))
  for ax, (ylabel, series) in zip(axes[0], panels):
    width = 0.8 / max(len(series), 1)
    for j, (label, (vals, stds)) in enumerate(series.items()):
      yerr = None if stds is None or np.all(np.isnan(np.asarray(stds, float))) else (
          np.nan_to_num(np.asarray(stds, float)))
      ax.bar(x + (j - (len(series) - 1) / 2) * width, np.asarray(vals, float), width,
             yerr=yerr, capsize=2, label=label)
    ax.set_xticks(x, list(groups))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
  axes[0][0].legend(fontsize=8)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=dpi)
  plt.close(fig)


def _box_smooth(c: np.ndarray) -> np.ndarray:
  """Mean over each cell's 3x3 neighbourhood (zero padded)."""
  p = np.pad(c, 1)
  return sum(p[i:i + c.shape[0], j:j + c.shape[1]] for i in range(3) for j in range(3)) / 9.0


def plot_density(path: str, x: Sequence[float], y: Sequence[float], *, xlabel: str,
                 ylabel: str, title: str = "", bins: int = 30,
                 contours: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
                 figsize: tuple[float, float] = (5.5, 4.0), dpi: int = 100) -> None:
  """2-D histogram of (x, y) points (colour = number of points per bin) with a colourbar.

  `contours` overlays other point clouds (label -> (x, y)) as density contour lines.
  """
  plt = _pyplot()
  x, y = np.asarray(x, float), np.asarray(y, float)
  all_x = np.concatenate([x] + [np.asarray(cx, float) for cx, _ in (contours or {}).values()])
  all_y = np.concatenate([y] + [np.asarray(cy, float) for _, cy in (contours or {}).values()])
  xe = np.linspace(all_x.min(), all_x.max() + 1e-9, bins + 1)
  ye = np.linspace(all_y.min(), all_y.max() + 1e-9, bins + 1)
  fig, ax = plt.subplots(figsize=figsize, dpi=dpi)
  counts, _, _ = np.histogram2d(x, y, bins=[xe, ye])
  masked = np.ma.masked_equal(counts.T, 0)
  mesh = ax.pcolormesh(xe, ye, masked, cmap="viridis", shading="flat")
  fig.colorbar(mesh, ax=ax, label="density (steps per bin)")
  handles = []
  cmap = plt.get_cmap("autumn")
  for j, (label, (cx, cy)) in enumerate((contours or {}).items()):
    c, _, _ = np.histogram2d(np.asarray(cx, float), np.asarray(cy, float), bins=[xe, ye])
    c = _box_smooth(c)  # a few hundred points in a fine grid give ragged contours
    if c.max() <= 0:
      continue
    colour = cmap(j / max(len(contours) - 1, 1))
    centers_x, centers_y = (xe[:-1] + xe[1:]) / 2, (ye[:-1] + ye[1:]) / 2
    levels = np.unique(np.quantile(c[c > 0], [0.5, 0.9]))
    if len(levels) and levels[-1] < c.max():
      ax.contour(centers_x, centers_y, c.T, levels=levels, colors=[colour], linewidths=1.0)
    handles.append(plt.Line2D([], [], color=colour, label=label))
  if handles:
    ax.legend(handles=handles, fontsize=8, loc="upper left")
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if title:
    ax.set_title(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=dpi)
  plt.close(fig)


def png_size(path: str) -> tuple[int, int]:
  """(width, height) from a PNG's IHDR chunk; ValueError if the file is not a PNG."""
  with open(path, "rb") as f:
    head = f.read(24)
  if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
    raise ValueError(f"{path} is not a PNG file")
  return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
