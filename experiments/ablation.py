r"""The paper's Figure 2: the full BAARA model vs without DMU vs without DTU, across alpha.

The Table 1 sweep (same run flags, same run reuse and resume) with a variant axis: 'full'
(DMU and DTU on), 'nodmu' (--dmu=false), 'nodtu' (--dtu=false). Runs go to
WORKDIR/<model>_s<seed>_a<alpha>[_<variant>]/.

  python experiments/ablation.py                    # gpt2_tiny, seed 2025, alpha 0/0.05/0.2
  python experiments/ablation.py --seeds=2025,2026 --workdir=runs/ablation2

Writes WORKDIR/ablation.md, ablation.csv, ablation.json and ablation.png (grouped bars of the
high-frequency word proportion and the generative entropy per variant and alpha).
"""

from __future__ import annotations

import math
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import common  # noqa: E402
from stabjax import plots, sweep, tables  # noqa: E402
from stabjax.metrics.aggregate import convergence_steps, plateau_step, seed_aggregate  # noqa: E402

FLAGS = flags.FLAGS
VARIANTS = {"full": {}, "nodmu": {"dmu": False}, "nodtu": {"dtu": False}}
VARIANT_TITLES = {"full": "full (DMU + DTU)", "nodmu": "without DMU", "nodtu": "without DTU"}
common.define_run_flags()
common.define_sweep_flags(models=["gpt2_tiny"], seeds=[2025], alphas=["0", "0.05", "0.2"],
                          workdir="runs/ablation")
flags.adopt_module_key_flags(common)  # --helpshort lists the run flags
flags.DEFINE_list("variants", list(VARIANTS), f"Ablation variants: {', '.join(VARIANTS)}.")
flags.DEFINE_bool("shared_c_tilde", True, "Give every variant the full model's PSU c~ "
                  "(--psu_c_tilde_from=full), so a variant differs from the full model only in "
                  "the unit it removes, not also in the PSU's eta_mod.")
flags.DEFINE_list("reuse_from", ["runs/table1"], "Sweep directories whose finished runs of the "
                  "same name and config are reused (the 'full' variant is a Table 1 run).")
# Table 1's run defaults, so that the 'full' variant is the Table 1 run (--reuse_from).
FLAGS.set_default("steps", 200)
FLAGS.set_default("progress", False)
# Every 10 steps: the in-training HF proportion has enough points for its plateau (and
# table1, ablation and mechanism runs stay one config, so they are reused across them).
FLAGS.set_default("eval_every", 10)

HF_KEY = "gen/hf_proportion"  # the in-training generation batch's HF share, at eval steps
PLATEAU_TAIL, PLATEAU_TOL = 0.2, 0.02


def hf_plateau(history: list[dict]) -> tuple[float | None, float | None]:
  """(level, step) of `plateau_step` on the run's logged HF proportion; (None, None) when
  the history has no such rows (a run trained before they were logged)."""
  rows = [(r["step"], r[HF_KEY]) for r in history if r.get(HF_KEY) is not None]
  if not rows:
    return None, None
  level, step = plateau_step([s for s, _ in rows], [v for _, v in rows],
                             tail_frac=PLATEAU_TAIL, tol=PLATEAU_TOL)
  return (None if math.isnan(level) else level), step


def speedups(records: list[dict], key: str, models, alphas, variants) -> list[dict]:
  """Per model, alpha and ablated variant: the full model's `key` step over the variant's,
  per seed, and its mean over the seeds where both are defined (> 0)."""
  by = {(r["model"], r["seed"], r["alpha"], r["variant"]): r for r in records}
  seeds = list(dict.fromkeys(r["seed"] for r in records))
  out = []
  for m in models:
    for a in alphas:
      for v in variants:
        if v == "full":
          continue
        ratios = []
        for s in seeds:
          full, var = by.get((m, s, a, "full"), {}).get(key), by.get((m, s, a, v), {}).get(key)
          if full is not None and var is not None and var > 0:
            ratios.append(full / var)
        out.append({"model": m, "alpha": a, "variant": v, "criterion": key,
                    "ratios": ratios, "seeds": len(seeds),
                    "ratio_mean": sum(ratios) / len(ratios) if ratios else None})
  return out


def speedup_cell(s: dict) -> str:
  """'24% faster' (full needs 76% of the variant's steps), '10% slower', or an em dash."""
  if s["ratio_mean"] is None:
    return "—"
  pct = 100.0 * (1.0 - s["ratio_mean"])
  text = f"{abs(pct):.0f}% {'faster' if pct >= 0 else 'slower'}"
  n = len(s["ratios"])
  return text if n == s["seeds"] else f"{text} ({n}/{s['seeds']} seeds)"


def write_outputs(workdir: str, records: list[dict], histories: dict, variants, seeds, alphas,
                  elapsed_s: float, command: str) -> list[str]:
  """ablation.md/.csv/.json/.png in `workdir`; returns their paths."""
  cols = sweep.metric_columns(records)
  metrics = [k for k, _ in cols]
  models = list(dict.fromkeys(r["model"] for r in records))
  n_seeds = len({r["seed"] for r in records})

  # Convergence (section 6.3), two readings. Loss: per model, seed and alpha, the step at
  # which each variant first reaches the training loss that all variants end at. HF: the
  # step from which the in-training generations' HF share stays on its final plateau.
  conv: dict[tuple, float | None] = {}
  thresholds = {}
  for m in models:
    for s in seeds:
      for a in alphas:
        thr, steps = convergence_steps({v: histories[m, s, a, v] for v in variants})
        thresholds[m, s, a] = thr
        conv.update({(m, s, a, v): st for v, st in steps.items()})
  for r in records:
    key = (r["model"], r["seed"], r["alpha"], r["variant"])
    r["loss_convergence_step"] = conv[key]
    r["hf_plateau_level"], r["hf_plateau_step"] = hf_plateau(histories[key])
  conv_keys = ["loss_convergence_step", "hf_plateau_step"]
  agg = seed_aggregate(records, ["model", "variant", "alpha"], metrics + conv_keys)
  by = {(g["model"], g["variant"], g["alpha"]): g for g in agg}
  speed = (speedups(records, "loss_convergence_step", models, alphas, variants)
           + speedups(records, "hf_plateau_step", models, alphas, variants)
           if "full" in variants else [])
  has_hf = any(r.get(HF_KEY) is not None for h in histories.values() for r in h)

  head = ["variant"] + [common.alpha_label(a) for a in alphas]
  sections = []
  for m in models:
    decoders = [d for d in sweep.DECODER_TITLES
                if any(sweep.decoder_key(d, "hf_proportion") in r for r in records)]
    hf_rows = [[VARIANT_TITLES[v], sweep.DECODER_TITLES[d]]
               + [tables.fmt_mean_std(by[m, v, a].get(sweep.decoder_key(d, "hf_proportion")),
                                      percent=True) for a in alphas]
               for d in decoders for v in variants]
    ent_rows = [[VARIANT_TITLES[v]] + [tables.fmt_mean_std(by[m, v, a].get("generative_entropy"))
                                       for a in alphas] for v in variants]
    conv_rows = [[VARIANT_TITLES[v], title] + [tables.fmt_mean_std(by[m, v, a].get(k))
                                               for a in alphas]
                 for k, title in (("loss_convergence_step", "loss"),
                                  ("hf_plateau_step", "HF plateau")) for v in variants]
    speed_rows = [[VARIANT_TITLES[v], title]
                  + [speedup_cell(next(s for s in speed if (s["model"], s["alpha"], s["variant"],
                                                            s["criterion"]) == (m, a, v, k)))
                     for a in alphas]
                  for k, title in (("loss_convergence_step", "loss"),
                                   ("hf_plateau_step", "HF plateau"))
                  for v in variants if v != "full" and speed]
    sections += [
        f"## {m}: high-frequency word proportion per decoder (mean ± std over {n_seeds} "
        "seed(s))", "",
        tables.markdown_table(["variant", "decoder"] + head[1:], hf_rows), "",
        f"## {m}: generative entropy (nats per sampled token)", "",
        tables.markdown_table(head, ent_rows), "",
        f"## {m}: convergence step (mean ± std over seeds)", "",
        tables.markdown_table(["variant", "criterion"] + head[1:], conv_rows), "",
    ]
    if speed_rows:
      sections += [
          f"## {m}: how much faster the full model converges than each ablation", "",
          "Per seed, the full model's convergence step divided by the ablated variant's, "
          "averaged over seeds; 'X% faster': the full model needs (100 - X)% of the "
          "variant's steps (the paper: \"the baseline converges 24% faster\", section 6.3).",
          "",
          tables.markdown_table(["compared with", "criterion"] + head[1:], speed_rows), "",
      ]
  metric_rows = [[r["model"], str(r["seed"]), f"{r['alpha']:g}", r["variant"]]
                 + [r.get(k) for k in metrics]
                 + [r.get("loss_convergence_step"), r.get("hf_plateau_step"),
                    tables.fmt_percent(r.get("hf_plateau_level"))]
                 for r in records]
  cfg0 = records[0]
  md = "\n".join([
      "# Figure 2: ablation of DMU and DTU (paper section 6.3)", "",
      f"Command: `{command}`  ",
      f"Data: `{cfg0['data']}`; {cfg0['steps']} steps per run; {len(records)} runs; "
      f"{tables.wall_time_note(records, elapsed_s)}", "",
      "Convergence step, two criteria. **loss**: the first logged step whose training loss "
      "reaches the level all variants end at (the largest over variants of the mean of "
      "the last 3 logged losses, per seed and α). **HF plateau**: from the HF proportion "
      "of the small generation batch sampled at every evaluation step (`gen/hf_proportion`), "
      f"the plateau level is the mean of the last max(3, ⌈{PLATEAU_TAIL:g}·n⌉) of the n "
      "values, and the plateau step is the first evaluation step from which every later "
      f"value stays within ±{100 * PLATEAU_TOL:g} points of that level (a series that "
      "leaves the band again counts from its return); its resolution is --eval_every, "
      "and a run with fewer than 3 such values has none (—)."
      + ("" if has_hf else " These runs have no `gen/hf_proportion` rows (trained before "
         "they were logged): the HF columns are empty; rerun in a new --workdir to fill "
         "them."), "",
      *sections,
      "## All metrics per run", "",
      tables.markdown_table(["model", "seed", "α", "variant"] + [t for _, t in cols]
                            + ["loss conv. step", "HF plateau step", "HF plateau level"],
                            metric_rows), "",
  ])
  paths = [os.path.join(workdir, f"ablation.{ext}") for ext in ("md", "csv", "json", "png")]
  with open(paths[0], "w") as f:
    f.write(md)
  tables.write_csv(paths[1], records)
  tables.write_json(paths[2], {
      "command": command, "elapsed_s": elapsed_s, "runs": records, "cross_seed": agg,
      "convergence_thresholds": [{"model": m, "seed": s, "alpha": a, "loss": t}
                                 for (m, s, a), t in thresholds.items()],
      "hf_plateau": {"key": HF_KEY, "tail_frac": PLATEAU_TAIL, "tol": PLATEAU_TOL},
      "speedups": speed})
  m = models[0]

  def series(key, scale=1.0):
    out = {}
    for v in variants:
      stats = [by[m, v, a].get(key, (float("nan"), float("nan"))) for a in alphas]
      out[VARIANT_TITLES[v]] = ([scale * s[0] for s in stats], [scale * s[1] for s in stats])
    return out

  plots.plot_grouped_bars(
      paths[3], [common.alpha_label(a) for a in alphas],
      [("high-frequency word proportion (%)", series("hf_proportion", 100.0)),
       ("generative entropy (nats/token)", series("generative_entropy"))],
      xlabel="feedback strength α",
      title=f"Figure 2 ablation, {m} ({n_seeds} seed(s); error bars: std over seeds)")
  return paths


def main(argv):
  common.no_positional_args(argv)
  models, seeds, alphas = common.parse_grid(FLAGS)
  variants = list(FLAGS.variants)
  for v in variants:
    if v not in VARIANTS:
      common.fail(f"--variants contains {v!r}; accepted: {', '.join(VARIANTS)}")
  if not variants:
    common.fail("--variants needs at least one value")
  base = common.base_config(FLAGS)
  # The full variant's c~ is its own, so it stays the Table 1 run (and is reused).
  shared = lambda v: ({"psu_c_tilde_from": "full"} if FLAGS.shared_c_tilde and v != "full"
                      else {})
  runs = [sweep.SweepRun(sweep.run_name(m, s, a, v),
                         sweep.override_config(base, model=m, seed=s, alpha=a, **VARIANTS[v],
                                               **shared(v)),
                         {"model": m, "seed": s, "alpha": a, "variant": v})
          for m in models for s in seeds for a in alphas for v in variants]
  os.makedirs(FLAGS.workdir, exist_ok=True)
  start = time.perf_counter()
  summaries = common.sweep(runs, FLAGS.workdir, reuse_from=FLAGS.reuse_from)
  elapsed = time.perf_counter() - start
  extra = {"data": base.data.spec, "steps": base.train.steps,
           "hf_top_k": base.generation.hf_top_k}
  records = [sweep.run_record({**r.labels, **extra}, s) for r, s in zip(runs, summaries)]
  histories = {tuple(r.labels[k] for k in ("model", "seed", "alpha", "variant")): s["history"]
               for r, s in zip(runs, summaries)}
  command = " ".join(["python experiments/ablation.py"] + sys.argv[1:])
  common.write_report(write_outputs, FLAGS.workdir, records, histories, variants, seeds,
                      alphas, elapsed, command)
  return 0


if __name__ == "__main__":
  app.run(main)
