r"""The paper's Table 1: high-frequency word proportion over models x seeds x alpha.

Every condition is one `train_and_evaluate` run in WORKDIR/<model>_s<seed>_a<alpha>/; a run
with a summary.json is reused, an interrupted one resumes from its checkpoint, so the
same command continues a sweep. Every run flag of main.py (--data, --steps, ...) applies
to every run; --model/--seed/--alpha are replaced by the lists below.

  python experiments/table1.py                      # synthetic language, the defaults
  python experiments/table1.py --data=text:/path/corpus.txt --models=gpt2_tiny \
      --seeds=2025 --workdir=runs/table1_text --cache_dir=/tmp/stabjax_cache

Writes WORKDIR/table1.md, table1.csv, table1.json and table1.png.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import common  # noqa: E402
from stabjax import report  # noqa: E402
from stabjax.metrics.aggregate import top_word_overlap  # noqa: E402

FLAGS = flags.FLAGS
common.define_run_flags()
flags.DEFINE_list("models", ["gpt2_tiny", "bert_tiny"], "Model sizes (rows of Table 1).")
flags.DEFINE_list("seeds", ["2025", "2026", "2027"], "Seeds (rows of Table 1).")
flags.DEFINE_list("alphas", ["0", "0.05", "0.2"], "Feedback strengths alpha (columns).")
flags.DEFINE_string("workdir", "runs/table1", "Sweep directory: one subdirectory per run.")
# Measured: the 18 default runs took 41 min on 2 CPU cores shared with other jobs
# (REPRODUCTION.md); the sweep must fit in an hour on such a machine.
FLAGS.set_default("steps", 200)
FLAGS.set_default("progress", False)


def parse_grid(F) -> tuple[list[str], list[int], list[float]]:
  """--models/--seeds/--alphas -> lists; a bad value ends the program with one line."""
  try:
    return report.parse_grid(F.models, F.seeds, F.alphas)
  except ValueError as e:
    common.fail(str(e))


def base_config(F):
  """The flags' RunConfig (validated once) that every condition overrides."""
  if not F["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  cfg = common.build_config(F)
  if F.distributed:
    import jax
    jax.distributed.initialize()
  common.check_mesh(cfg)
  return cfg


def sweep(runs: list[report.SweepRun], workdir: str, reuse_from: list[str] | tuple = ()
          ) -> list[dict]:
  """report.run_sweep with the launcher's error handling; exits if a run was preempted."""
  from stabjax.data import DataError
  from stabjax.run import NonFiniteLossError
  try:
    summaries = report.run_sweep(runs, workdir, show_progress=FLAGS.progress,
                                 reuse_from=reuse_from)
  except (DataError, NonFiniteLossError, ValueError) as e:
    common.fail(str(e), code=1)
  if len(summaries) < len(runs) or summaries[-1]["status"] != "finished":
    print("sweep interrupted: run the same command again to continue")
    sys.exit(1)
  return summaries


def alpha_label(a: float) -> str:
  return f"α={a:g}"


def write_outputs(workdir: str, records: list[dict], models, seeds, alphas, elapsed_s: float,
                  command: str) -> list[str]:
  """table1.md/.csv/.json/.png in `workdir`; returns their paths."""
  by_key = {(r["model"], r["seed"], r["alpha"]): r for r in records}
  cols = report.metric_columns(records)
  metrics = [k for k, _ in cols]
  cfg0 = records[0]

  decoders = [d for d in report.DECODER_TITLES
              if any(report.decoder_key(d, "hf_proportion") in r for r in records)]
  hf_rows = []
  for m in models:
    for s in seeds:
      for a in alphas:
        r = by_key[m, s, a]
        hf_rows.append([m, str(s), f"{a:g}"]
                       + [report.fmt_percent(r.get(report.decoder_key(d, "hf_proportion")))
                          for d in decoders]
                       + [report.fmt_percent(r.get("hf_proportion_reference"))])
  hf_table = report.markdown_table(
      ["model", "seed", "α"] + [report.DECODER_TITLES[d] for d in decoders]
      + ["held-out reference"], hf_rows)

  metric_rows = [[r["model"], str(r["seed"]), f"{r['alpha']:g}"] + [r.get(k) for k in metrics]
                 for r in records]
  metric_table = report.markdown_table(["model", "seed", "α"] + [t for _, t in cols],
                                       metric_rows)

  agg = report.seed_aggregate(records, ["model", "alpha"], metrics)
  for g in agg:  # SPEC 9 cross-seed consistency: do the seeds favour the same words?
    runs = [r for r in records if r["model"] == g["model"] and r["alpha"] == g["alpha"]]
    g["top_word_overlap"] = top_word_overlap(
        [report.sample_words(r["run_dir"]) for r in runs], k=cfg0["hf_top_k"])
  agg_rows = [[g["model"], f"{g['alpha']:g}", str(g["n"]), g["top_word_overlap"]]
              + [report.fmt_mean_std(g.get(k), percent="hf_proportion" in k)
                 for k in metrics] for g in agg]
  agg_table = report.markdown_table(
      ["model", "α", "seeds", f"top-{cfg0['hf_top_k']} word overlap (Jaccard)"]
      + [t for _, t in cols], agg_rows)

  md = "\n".join([
      "# Table 1: high-frequency word proportion (paper section 6.2)",
      "",
      f"Command: `{command}`  ",
      f"Data: `{cfg0['data']}`; {cfg0['steps']} steps per run; {len(records)} runs; "
      f"{report.wall_time_note(records, elapsed_s)}",
      "",
      f"Cell: share of generated words among the top-{cfg0['hf_top_k']} most frequent "
      "training-corpus words, in % (the paper's core metric), per decoder (the paper does "
      "not say how it decodes; each decoder continues the same prompts): sampling at "
      "temperature 1, greedy, top-k 40, nucleus 0.9. 'held-out reference' is the same share "
      "on held-out validation text (the value of the data, not of a model).",
      "",
      hf_table,
      "",
      "## All metrics per run",
      "",
      metric_table,
      "",
      "## Mean ± std across seeds (sample std, ddof=1)",
      "",
      agg_table,
      "",
  ])
  paths = [os.path.join(workdir, f"table1.{ext}") for ext in ("md", "csv", "json", "png")]
  with open(paths[0], "w") as f:
    f.write(md)
  report.write_csv(paths[1], records)
  report.write_json(paths[2], {"command": command, "elapsed_s": elapsed_s, "runs": records,
                               "cross_seed": agg})
  series = {}
  for m in models:
    stats = {g["alpha"]: g.get("hf_proportion") for g in agg if g["model"] == m}
    series[m] = ([stats[a][0] for a in alphas], [stats[a][1] for a in alphas])
  ref = cfg0.get("hf_proportion_reference")
  if ref is not None:
    series["held-out reference"] = ([ref] * len(alphas), None)
  report.plot_lines(paths[3], alphas, series, xlabel="feedback strength α",
                    ylabel="high-frequency word proportion (%)", percent=True,
                    title=f"Table 1: top-{cfg0['hf_top_k']} word share vs α "
                          f"(mean ± std over {len(seeds)} seeds)")
  return paths


def main(argv):
  if len(argv) > 1:
    common.fail(f"unexpected arguments {argv[1:]}; all options are --flags (see --helpshort)")
  models, seeds, alphas = parse_grid(FLAGS)
  base = base_config(FLAGS)
  runs = [report.SweepRun(report.run_name(m, s, a),
                          report.override_config(base, model=m, seed=s, alpha=a),
                          {"model": m, "seed": s, "alpha": a})
          for m in models for s in seeds for a in alphas]
  os.makedirs(FLAGS.workdir, exist_ok=True)
  start = time.perf_counter()
  summaries = sweep(runs, FLAGS.workdir)
  elapsed = time.perf_counter() - start
  extra = {"data": base.data.spec, "steps": base.train.steps,
           "hf_top_k": base.generation.hf_top_k}
  records = [report.run_record({**r.labels, **extra, "run_dir": os.path.relpath(s["workdir"])}, s)
             for r, s in zip(runs, summaries)]
  command = " ".join(["python experiments/table1.py"] + sys.argv[1:])
  paths = write_outputs(FLAGS.workdir, records, models, seeds, alphas, elapsed, command)
  print(open(paths[0]).read())
  print("wrote " + ", ".join(paths))
  return 0


if __name__ == "__main__":
  app.run(main)
