r"""The paper's Figure 2: the full BAARA model vs without DMU vs without DTU, across alpha.

The Table 1 sweep (experiments/table1.py: same flags, same run reuse and resume) with a
variant axis: 'full' (DMU and DTU on), 'nodmu' (--dmu=false), 'nodtu' (--dtu=false). Runs
go to WORKDIR/<model>_s<seed>_a<alpha>[_<variant>]/.

  python experiments/ablation.py                    # gpt2_tiny, seed 2025, alpha 0/0.05/0.2
  python experiments/ablation.py --seeds=2025,2026 --workdir=runs/ablation2

Writes WORKDIR/ablation.md, ablation.csv, ablation.json and ablation.png (grouped bars of the
high-frequency word proportion and the generative entropy per variant and alpha).
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The sweep flags (--models, --seeds, --alphas, --workdir and every run flag) and the
# sweep itself come from the Table 1 launcher; only the defaults differ.
from experiments import common, table1  # noqa: E402
from stabjax import report  # noqa: E402

FLAGS = flags.FLAGS
VARIANTS = {"full": {}, "nodmu": {"dmu": False}, "nodtu": {"dtu": False}}
VARIANT_TITLES = {"full": "full (DMU + DTU)", "nodmu": "without DMU", "nodtu": "without DTU"}
flags.DEFINE_list("variants", list(VARIANTS), f"Ablation variants: {', '.join(VARIANTS)}.")
flags.DEFINE_bool("shared_c_tilde", True, "Give every variant the full model's PSU c~ "
                  "(--psu_c_tilde_from=full), so a variant differs from the full model only in "
                  "the unit it removes, not also in the PSU's eta_mod.")
flags.DEFINE_list("reuse_from", ["runs/table1"], "Sweep directories whose finished runs of the "
                  "same name and config are reused (the 'full' variant is a Table 1 run).")
FLAGS.set_default("models", ["gpt2_tiny"])
FLAGS.set_default("seeds", ["2025"])
FLAGS.set_default("workdir", "runs/ablation")


def write_outputs(workdir: str, records: list[dict], histories: dict, variants, seeds, alphas,
                  elapsed_s: float, command: str) -> list[str]:
  """ablation.md/.csv/.json/.png in `workdir`; returns their paths."""
  cols = report.metric_columns(records)
  metrics = [k for k, _ in cols]
  models = list(dict.fromkeys(r["model"] for r in records))

  # Convergence (section 6.3): per model, seed and alpha, the step at which each variant
  # first reaches the training loss that all variants end at; averaged over seeds.
  conv: dict[tuple, list] = {}
  thresholds = {}
  for m in models:
    for s in seeds:
      for a in alphas:
        thr, steps = report.convergence_steps({v: histories[m, s, a, v] for v in variants})
        thresholds[m, s, a] = thr
        for v, st in steps.items():
          conv.setdefault((m, a, v), []).append(st)
  for r in records:
    r["loss_convergence_step"] = dict(zip(seeds, conv[r["model"], r["alpha"], r["variant"]])
                                      )[r["seed"]]
  agg = report.seed_aggregate(records, ["model", "variant", "alpha"],
                              metrics + ["loss_convergence_step"])
  by = {(g["model"], g["variant"], g["alpha"]): g for g in agg}

  sections = []
  for m in models:
    decoders = [d for d in report.DECODER_TITLES
                if any(report.decoder_key(d, "hf_proportion") in r for r in records)]
    hf_rows = [[VARIANT_TITLES[v], report.DECODER_TITLES[d]]
               + [report.fmt_mean_std(by[m, v, a].get(report.decoder_key(d, "hf_proportion")),
                                      percent=True) for a in alphas]
               for d in decoders for v in variants]
    ent_rows = [[VARIANT_TITLES[v]] + [report.fmt_mean_std(by[m, v, a].get("generative_entropy"))
                                       for a in alphas] for v in variants]
    conv_rows = [[VARIANT_TITLES[v]] + [report.fmt_mean_std(
        by[m, v, a].get("loss_convergence_step")) for a in alphas] for v in variants]
    head = ["variant"] + [table1.alpha_label(a) for a in alphas]
    sections += [
        f"## {m}: high-frequency word proportion per decoder (mean ± std over {len(seeds)} "
        "seed(s))", "",
        report.markdown_table(["variant", "decoder"] + head[1:], hf_rows), "",
        f"## {m}: generative entropy (nats per sampled token)", "",
        report.markdown_table(head, ent_rows), "",
        f"## {m}: convergence step (first logged step whose training loss reaches the level "
        "all variants end at: the largest over variants of the mean of the last 3 logged "
        "losses, per seed and alpha)", "",
        report.markdown_table(head, conv_rows), "",
    ]
  metric_rows = [[r["model"], str(r["seed"]), f"{r['alpha']:g}", r["variant"]]
                 + [r.get(k) for k in metrics] + [r.get("loss_convergence_step")]
                 for r in records]
  cfg0 = records[0]
  md = "\n".join([
      "# Figure 2: ablation of DMU and DTU (paper section 6.3)", "",
      f"Command: `{command}`  ",
      f"Data: `{cfg0['data']}`; {cfg0['steps']} steps per run; {len(records)} runs; "
      f"{report.wall_time_note(records, elapsed_s)}", "",
      *sections,
      "## All metrics per run", "",
      report.markdown_table(["model", "seed", "α", "variant"] + [t for _, t in cols]
                            + ["loss conv. step"], metric_rows), "",
  ])
  paths = [os.path.join(workdir, f"ablation.{ext}") for ext in ("md", "csv", "json", "png")]
  with open(paths[0], "w") as f:
    f.write(md)
  report.write_csv(paths[1], records)
  report.write_json(paths[2], {"command": command, "elapsed_s": elapsed_s, "runs": records,
                               "cross_seed": agg,
                               "convergence_thresholds": [
                                   {"model": m, "seed": s, "alpha": a, "loss": t}
                                   for (m, s, a), t in thresholds.items()]})
  m = models[0]

  def series(key, scale=1.0):
    out = {}
    for v in variants:
      stats = [by[m, v, a].get(key, (float("nan"), float("nan"))) for a in alphas]
      out[VARIANT_TITLES[v]] = ([scale * s[0] for s in stats], [scale * s[1] for s in stats])
    return out

  report.plot_grouped_bars(
      paths[3], [table1.alpha_label(a) for a in alphas],
      [("high-frequency word proportion (%)", series("hf_proportion", 100.0)),
       ("generative entropy (nats/token)", series("generative_entropy"))],
      xlabel="feedback strength α",
      title=f"Figure 2 ablation, {m} ({len(seeds)} seed(s); error bars: std over seeds)")
  return paths


def main(argv):
  if len(argv) > 1:
    common.fail(f"unexpected arguments {argv[1:]}; all options are --flags (see --helpshort)")
  models, seeds, alphas = table1.parse_grid(FLAGS)
  variants = list(FLAGS.variants)
  for v in variants:
    if v not in VARIANTS:
      common.fail(f"--variants contains {v!r}; accepted: {', '.join(VARIANTS)}")
  if not variants:
    common.fail("--variants needs at least one value")
  base = table1.base_config(FLAGS)
  # The full variant's c~ is its own, so it stays the Table 1 run (and is reused).
  shared = lambda v: ({"psu_c_tilde_from": "full"} if FLAGS.shared_c_tilde and v != "full"
                      else {})
  runs = [report.SweepRun(report.run_name(m, s, a, v),
                          report.override_config(base, model=m, seed=s, alpha=a, **VARIANTS[v],
                                                 **shared(v)),
                          {"model": m, "seed": s, "alpha": a, "variant": v})
          for m in models for s in seeds for a in alphas for v in variants]
  os.makedirs(FLAGS.workdir, exist_ok=True)
  start = time.perf_counter()
  summaries = table1.sweep(runs, FLAGS.workdir, reuse_from=FLAGS.reuse_from)
  elapsed = time.perf_counter() - start
  extra = {"data": base.data.spec, "steps": base.train.steps,
           "hf_top_k": base.generation.hf_top_k}
  records = [report.run_record({**r.labels, **extra}, s) for r, s in zip(runs, summaries)]
  histories = {tuple(r.labels[k] for k in ("model", "seed", "alpha", "variant")): s["history"]
               for r, s in zip(runs, summaries)}
  command = " ".join(["python experiments/ablation.py"] + sys.argv[1:])
  paths = write_outputs(FLAGS.workdir, records, histories, variants, seeds, alphas, elapsed,
                        command)
  print(open(paths[0]).read())
  print("wrote " + ", ".join(paths))
  return 0


if __name__ == "__main__":
  app.run(main)
