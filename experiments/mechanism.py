r"""Stabilisation or entropy minimisation? alpha x feedback form x seed, on two corpora.

The Table 1 reading of the feedback, (alpha/2)(H - 0)^2, asks for lower entropy: "lower
entropy, more frequent words" may be the objective doing what it says rather than the
paper's "stabilisation". This sweep separates the two with the feedback forms of
`stabjax.configs.FEEDBACK_FORMS`:

  zero      (alpha/2)(H - 0)^2            pulls H down (Table 1's runs)
  ema       (alpha/2)(H - sg(EMA(H)))^2   damps H's fluctuation, leaves its level free
  data      (alpha/2)(H - H_data)^2       setpoint at the data's entropy
  psu_only  no loss term                  alpha only in the PSU's confidence

H_data: on synthetic data the language's exact conditional entropy per predicted token;
on text, the validation predictive entropy of the same seed's alpha = 0 run (a model
trained without feedback: our estimate of the text's entropy at this model size and
budget), so the alpha = 0 runs go first. alpha = 0 is one run per seed and corpus,
shared by every form (no form has a term or a PSU factor at alpha = 0).

  python experiments/mechanism.py             # synthetic + tiny Shakespeare, 3 seeds
  python experiments/mechanism.py --datasets=synthetic --seeds=2025

The default text corpus is ../shared/corpora/tinyshakespeare.txt; elsewhere download it
(https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt)
and pass --datasets=synthetic,text:PATH. Runs go to WORKDIR/<corpus>/<model>_s<seed>_a<alpha>
[_<form>] (the zero form has no suffix: it is the Table 1 run, reused from --reuse_from).

Writes WORKDIR/mechanism.md, .csv, .json, .png and samples_<corpus>.md.
"""

from __future__ import annotations

import math
import os
import sys
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import common  # noqa: E402
from stabjax import plots, sweep, tables  # noqa: E402
from stabjax.configs import FEEDBACK_FORMS  # noqa: E402
from stabjax.data import text_builder  # noqa: E402
from stabjax.metrics.aggregate import seed_aggregate  # noqa: E402

FLAGS = flags.FLAGS
common.define_run_flags()
common.define_sweep_flags(models=["gpt2_tiny"], seeds=[2025, 2026, 2027],
                          alphas=["0", "0.05", "0.2"], workdir="runs/mechanism")
flags.adopt_module_key_flags(common)  # --helpshort lists the run flags
flags.DEFINE_list("forms", list(FEEDBACK_FORMS), f"Feedback forms: {', '.join(FEEDBACK_FORMS)}.")
flags.DEFINE_list("datasets", ["synthetic", "text:../shared/corpora/tinyshakespeare.txt"],
                  "Corpora (--data values), each swept in full.")
flags.DEFINE_list("reuse_from", ["runs/table1"], "Sweep directories whose finished runs of the "
                  "same name and config are reused (the zero form on synthetic is Table 1's).")
flags.DEFINE_float("tail", 0.2, "Share of the last logged steps over which H(B_t)'s level and "
                   "fluctuation are measured.")
FLAGS.set_default("steps", 200)
FLAGS.set_default("progress", False)
FLAGS.set_default("eval_every", 10)

FORM_TITLES = {"zero": "zero: (α/2)H²", "ema": "ema: (α/2)(H−EMA)²",
               "data": "data: (α/2)(H−H_data)²", "psu_only": "psu_only: no loss term"}
DECODERS = ("sample", "greedy", "top_k", "nucleus")
PANELS = (("hf_proportion", "HF proportion, sampling (%)", 100.0, (0.0, 100.0)),
          ("generative_entropy", "gen. entropy, sampling (nats)", 1.0, None),
          ("val_ppl", "validation perplexity", 1.0, None),
          ("h_tail_mean", "H(B_t), last steps (nats)", 1.0, None),
          ("dh_tail_std", "std of ΔH(B_t), last steps", 1.0, None))


def corpus_label(spec: str) -> str:
  """'synthetic' -> 'synthetic'; 'text:dir/tinyshakespeare.txt' -> 'tinyshakespeare'."""
  if spec.startswith("text:"):
    return os.path.splitext(os.path.basename(spec[5:].rstrip("/")))[0] or "text"
  return spec.replace(":", "_").replace("/", "_")


def entropy_tail(history: list[dict], tail: float) -> dict[str, float]:
  """Level and fluctuation of H(B_t) over the last `tail` of the logged training steps:
  mean, std, and std of the step-to-step change (which a trend does not inflate)."""
  h = np.asarray([r["entropy"] for r in history if "entropy" in r], float)
  h = h[-max(3, math.ceil(tail * len(h))):]
  return {"h_tail_mean": float(h.mean()), "h_tail_std": float(h.std(ddof=1)),
          "dh_tail_std": float(np.diff(h).std(ddof=1))}


def plan(base, models, seeds, alphas, forms, spec, targets=None) -> list[sweep.SweepRun]:
  """The runs of one corpus: alpha = 0 once per (model, seed), then every form at alpha > 0.
  `targets[(model, seed)]` is H_data for the data form on text (None: resolved from data)."""
  runs = []
  cfg0 = sweep.override_config(base, data_spec=spec)
  for m in models:
    for s in seeds:
      for a in alphas:
        for f in (["zero"] if a == 0 else forms):
          target = (targets or {}).get((m, s)) if f == "data" else None
          cfg = sweep.override_config(cfg0, model=m, seed=s, alpha=a, feedback=f,
                                      feedback_target=target)
          runs.append(sweep.SweepRun(
              sweep.run_name(m, s, a, "full" if f == "zero" else f), cfg,
              {"corpus": corpus_label(spec), "model": m, "seed": s, "alpha": a, "form": f}))
  return runs


def expand_alpha0(records: list[dict], forms) -> list[dict]:
  """The shared alpha = 0 record copied under every form (each form's line starts there)."""
  out = []
  for r in records:
    if r["alpha"] == 0:
      out += [{**r, "form": f} for f in forms]
    else:
      out.append(r)
  return out


def write_outputs(workdir: str, records: list[dict], alphas, forms, seeds, elapsed_s: float,
                  command: str) -> list[str]:
  keys = ([sweep.decoder_key(d, "hf_proportion") for d in DECODERS]
          + [sweep.decoder_key(d, "generative_entropy") for d in DECODERS]
          + ["val_ppl", "val_entropy", "h_tail_mean", "h_tail_std", "dh_tail_std",
             "hf_proportion_reference", "psu_multiplier"])
  expanded = expand_alpha0(records, forms)
  agg = seed_aggregate(expanded, ["corpus", "model", "form", "alpha"], keys)
  by = {(g["corpus"], g["model"], g["form"], g["alpha"]): g for g in agg}
  corpora = list(dict.fromkeys(r["corpus"] for r in records))
  models = list(dict.fromkeys(r["model"] for r in records))
  n_seeds = len(set(r["seed"] for r in records))
  head = ["form"] + [common.alpha_label(a) for a in alphas]

  def table(c, m, key, percent=False, digits=4):
    return tables.markdown_table(head, [
        [FORM_TITLES[f]] + [tables.fmt_mean_std(by.get((c, m, f, a), {}).get(key), digits,
                                                percent=percent) for a in alphas]
        for f in forms])

  sections = []
  for c in corpora:
    for m in models:
      ref = next((r.get("hf_proportion_reference") for r in records if r["corpus"] == c), None)
      targets = sorted({r["feedback_target"] for r in records
                        if r["corpus"] == c and r.get("feedback_target") is not None})
      sections += [f"## {c}, {m}", "",
                   f"Held-out reference HF proportion: {tables.fmt_percent(ref)}. H_data of "
                   f"the data form: {', '.join(f'{t:.3f}' for t in targets) or '—'} nats.", ""]
      for d in DECODERS:
        sections += [f"HF proportion, {sweep.DECODER_TITLES[d]}:", "",
                     table(c, m, sweep.decoder_key(d, "hf_proportion"), percent=True), ""]
      for d in DECODERS:
        sections += [f"Generative entropy (nats per generated token), "
                     f"{sweep.DECODER_TITLES[d]}:", "",
                     table(c, m, sweep.decoder_key(d, "generative_entropy")), ""]
      for key, title in (("val_ppl", "Validation perplexity"),
                         ("h_tail_mean", "Training H(B_t), mean over the last steps"),
                         ("h_tail_std", "Training H(B_t), std over the last steps"),
                         ("dh_tail_std", "Std of the step-to-step change of H(B_t) over "
                                         "the last steps (the fluctuation a trend does not "
                                         "inflate)")):
        sections += [f"{title}:", "", table(c, m, key), ""]
  cols = ["corpus", "model", "seed", "alpha", "form"]
  run_rows = [[r[k] if k != "alpha" else f"{r[k]:g}" for k in cols]
              + [tables.fmt_percent(r.get("hf_proportion")),
                 tables.fmt_percent(r.get("greedy/hf_proportion")),
                 r.get("generative_entropy"), r.get("val_ppl"), r.get("h_tail_mean"),
                 r.get("dh_tail_std"), r.get("feedback_target")] for r in records]
  md = "\n".join([
      "# Stabilisation or entropy minimisation? (issue 12)", "",
      f"Command: `{command}`  ",
      f"{len(records)} runs ({n_seeds} seed(s); α = 0 is one run per seed and corpus, shared by "
      f"every form); {records[0]['steps']} steps each; "
      f"{tables.wall_time_note(records, elapsed_s)}", "",
      "Cells: mean ± std over seeds (sample std). HF proportion: share of generated words "
      "among the top-20 training words. 'Last steps': the last "
      f"{FLAGS.tail:.0%} of the logged training steps.", "",
      *sections,
      "## Every run", "",
      tables.markdown_table(cols + ["HF (sampling)", "HF (greedy)", "gen. entropy", "val ppl",
                                    "H tail mean", "ΔH tail std", "H_data"], run_rows), "",
  ])
  paths = [os.path.join(workdir, f"mechanism.{e}") for e in ("md", "csv", "json", "png")]
  with open(paths[0], "w") as f:
    f.write(md)
  tables.write_csv(paths[1], records)
  tables.write_json(paths[2], {"command": command, "elapsed_s": elapsed_s, "runs": records,
                               "cross_seed": agg})
  rows = [(f"{c}, {m}", {FORM_TITLES[f]: {key: [by.get((c, m, f, a), {}).get(key)
                                                 for a in alphas] for key, *_ in PANELS}
                         for f in forms}) for c in corpora for m in models]
  plots.plot_panel_grid(paths[3], alphas, rows, PANELS,
                        title=f"Feedback forms vs α (mean ± std over {n_seeds} seed(s))")
  for c in corpora:  # the first model and seed: α = 0, then every form at the largest α
    m, s, top = models[0], min(r["seed"] for r in records), max(alphas)
    chosen = [r for r in records if (r["corpus"], r["model"], r["seed"]) == (c, m, s)
              and (r["alpha"] == 0 or r["alpha"] == top)]
    columns = {("α=0" if r["alpha"] == 0 else f"{r['form']} α={top:g}"):
               sweep.read_samples(r["run_dir"]) for r in chosen}
    path = os.path.join(workdir, f"samples_{c}.md")
    with open(path, "w") as f:
      f.write(f"# {c}: generations of {m}, seed {s}, at α=0 and each form at α={top:g}\n\n"
              + tables.side_by_side_samples(columns) + "\n")
    paths.append(path)
  return paths


def main(argv):
  common.no_positional_args(argv)
  models, seeds, alphas = common.parse_grid(FLAGS)
  forms = list(FLAGS.forms)
  bad = [f for f in forms if f not in FEEDBACK_FORMS]
  if bad or not forms:
    common.fail(f"--forms={','.join(forms)!r} is not accepted; accepted: one or more of "
                f"{', '.join(FEEDBACK_FORMS)}")
  if 0.0 not in alphas:
    common.fail("--alphas must include 0: it is every form's baseline (and H_data on text)")
  if not 0 < FLAGS.tail <= 1:
    common.fail(f"--tail={FLAGS.tail} is not accepted; accepted: a share in (0, 1]")
  base = common.base_config(FLAGS)
  for spec in FLAGS.datasets:  # every corpus checked before the first run starts
    try:
      cfg = sweep.override_config(base, data_spec=spec)
      if cfg.data.data_spec.kind == "text":
        text_builder.resolve_files(cfg.data.data_spec.path)
    except ValueError as e:
      common.fail(f"--datasets: {e}")
  start = time.perf_counter()
  records = []
  for spec in FLAGS.datasets:
    workdir = os.path.join(FLAGS.workdir, corpus_label(spec))
    os.makedirs(workdir, exist_ok=True)
    # alpha = 0 first: its validation entropy is H_data of the data form on text.
    first = plan(base, models, seeds, [0.0], forms, spec)
    done = common.sweep(first, workdir, reuse_from=FLAGS.reuse_from)
    targets = None
    if not spec.startswith("synthetic"):
      targets = {(r.labels["model"], r.labels["seed"]): round(s["final"]["val_entropy"], 6)
                 for r, s in zip(first, done)}
    rest = [r for r in plan(base, models, seeds, alphas, forms, spec, targets)
            if r.labels["alpha"] != 0]
    summaries = done + common.sweep(rest, workdir, reuse_from=FLAGS.reuse_from)
    for r, s in zip(first + rest, summaries):
      records.append(sweep.run_record(
          {**r.labels, "steps": base.train.steps, "run_dir": os.path.relpath(s["workdir"]),
           "feedback_target": _target(s)}, s) | entropy_tail(s["history"], FLAGS.tail)
          | {"val_entropy": s["final"].get("val_entropy")})
  elapsed = time.perf_counter() - start
  command = " ".join(["python experiments/mechanism.py"] + sys.argv[1:])
  common.write_report(write_outputs, FLAGS.workdir, records, alphas, forms, seeds, elapsed,
                      command)
  return 0


def _target(summary: dict) -> float | None:
  """The H_data a data-form run trained with (its config.json), else None."""
  import json
  path = os.path.join(summary["workdir"], "config.json")
  with open(path) as f:
    train = json.load(f)["train"]
  return train.get("feedback_target") if train.get("feedback") == "data" else None


if __name__ == "__main__":
  app.run(main)
