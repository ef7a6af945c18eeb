r"""The paper's Table 1: high-frequency word proportion over models x seeds x alpha.

Every condition is one `train_and_evaluate` run in WORKDIR/<model>_s<seed>_a<alpha>/; a run
with a summary.json is reused, an interrupted one resumes from its checkpoint, so the
same command continues a sweep. Every run flag of main.py (--data, --steps, ...) applies
to every run; --model/--seed/--alpha are replaced by the lists below.

  python experiments/table1.py                      # synthetic language, the defaults
  python experiments/table1.py --data=text:/path/corpus.txt --models=gpt2_tiny \
      --seeds=2025 --workdir=runs/table1_text --cache_dir=/tmp/stabjax_cache

Writes WORKDIR/table1.md, table1.csv, table1.json, table1.png and samples_side_by_side.md.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import common  # noqa: E402
from stabjax import plots, sweep, tables  # noqa: E402
from stabjax.metrics.aggregate import seed_aggregate, top_word_overlap  # noqa: E402

FLAGS = flags.FLAGS
common.define_run_flags()
common.define_sweep_flags(models=["gpt2_tiny", "bert_tiny"], seeds=[2025, 2026, 2027],
                          alphas=["0", "0.05", "0.2"], workdir="runs/table1")
flags.adopt_module_key_flags(common)  # --helpshort lists the run flags
# Measured: the 18 default runs took 41 min on 2 CPU cores shared with other jobs
# (REPRODUCTION.md); the sweep must fit in an hour on such a machine.
FLAGS.set_default("steps", 200)
FLAGS.set_default("progress", False)
# Every 10 steps: the in-training HF proportion has enough points for its plateau (and
# table1, ablation and mechanism runs stay one config, so they are reused across them).
FLAGS.set_default("eval_every", 10)

# The paper's Table 1 (section 6.2, Table 1): HF word proportion in % per alpha. The paper
# gives no generative entropy or perplexity values, so only the HF panel shows them.
PAPER_HF_PERCENT: dict[str, dict[float, float]] = {
    "paper GPT-2 1B (mean of 3 seeds)": {0.0: 26.83, 0.05: 65.77, 0.2: 100.0},
    "paper BERT 1B": {0.0: 23.5, 0.05: 56.3, 0.2: 100.0},
}


def write_samples(path: str, records: list[dict], model: str, seed: int, alphas) -> str | None:
  """samples_side_by_side.md: `model`'s generations of `seed` for every alpha; the path,
  or None when no run of that model and seed has a samples.txt."""
  columns = {}
  for a in alphas:
    run = next((r for r in records if (r["model"], r["seed"], r["alpha"]) == (model, seed, a)),
               None)
    if run is not None and run.get("run_dir"):
      columns[common.alpha_label(a)] = sweep.read_samples(run["run_dir"])
  if not any(columns.values()):
    return None
  with open(path, "w") as f:
    f.write("\n".join([
        f"# Generations side by side: {model}, seed {seed}, every α", "",
        "The same validation prompts continued by the run of each α (the first 5; every "
        "generation is in the run's samples.txt).", "",
        tables.side_by_side_samples(columns)]))
  return path


def write_outputs(workdir: str, records: list[dict], models, seeds, alphas, elapsed_s: float,
                  command: str) -> list[str]:
  """table1.md/.csv/.json/.png (and samples_side_by_side.md) in `workdir`; their paths."""
  by_key = {(r["model"], r["seed"], r["alpha"]): r for r in records}
  cols = sweep.metric_columns(records)
  metrics = [k for k, _ in cols]
  cfg0 = records[0]
  n_seeds = len({r["seed"] for r in records})

  decoders = [d for d in sweep.DECODER_TITLES
              if any(sweep.decoder_key(d, "hf_proportion") in r for r in records)]
  hf_rows = []
  for m in models:
    for s in seeds:
      for a in alphas:
        r = by_key[m, s, a]
        hf_rows.append([m, str(s), f"{a:g}"]
                       + [tables.fmt_percent(r.get(sweep.decoder_key(d, "hf_proportion")))
                          for d in decoders]
                       + [tables.fmt_percent(r.get("hf_proportion_reference"))])
  hf_table = tables.markdown_table(
      ["model", "seed", "α"] + [sweep.DECODER_TITLES[d] for d in decoders]
      + ["held-out reference"], hf_rows)

  metric_rows = [[r["model"], str(r["seed"]), f"{r['alpha']:g}"] + [r.get(k) for k in metrics]
                 for r in records]
  metric_table = tables.markdown_table(["model", "seed", "α"] + [t for _, t in cols],
                                       metric_rows)

  agg = seed_aggregate(records, ["model", "alpha"], metrics)
  for g in agg:  # SPEC 9 cross-seed consistency: do the seeds favour the same words?
    runs = [r for r in records if r["model"] == g["model"] and r["alpha"] == g["alpha"]]
    g["top_word_overlap"] = top_word_overlap(
        [sweep.sample_words(r["run_dir"]) for r in runs], k=cfg0["hf_top_k"])
  agg_rows = [[g["model"], f"{g['alpha']:g}", str(g["n"]), g["top_word_overlap"]]
              + [tables.fmt_mean_std(g.get(k), percent="hf_proportion" in k)
                 for k in metrics] for g in agg]
  agg_table = tables.markdown_table(
      ["model", "α", "seeds", f"top-{cfg0['hf_top_k']} word overlap (Jaccard)"]
      + [t for _, t in cols], agg_rows)

  samples_path = write_samples(os.path.join(workdir, "samples_side_by_side.md"), records,
                               models[0], seeds[0], alphas)
  md = "\n".join([
      "# Table 1: high-frequency word proportion (paper section 6.2)",
      "",
      f"Command: `{command}`  ",
      f"Data: `{cfg0['data']}`; {cfg0['steps']} steps per run; {len(records)} runs; "
      f"{tables.wall_time_note(records, elapsed_s)}",
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
      f"## Mean ± std across seeds ({n_seeds} seed(s); sample std, ddof=1)",
      "",
      agg_table,
      "",
      "![Table 1](table1.png)",
      "",
      "Plot: mean ± std over seeds; the paper's Table 1 values (section 6.2, 1B models, "
      "HF proportion only) as open markers; the dashed line is the held-out reference.",
      "",
  ] + ([f"Generations side by side ({models[0]}, seed {seeds[0]}): "
        "[samples_side_by_side.md](samples_side_by_side.md)", ""] if samples_path else []))
  paths = [os.path.join(workdir, f"table1.{ext}") for ext in ("md", "csv", "json", "png")]
  with open(paths[0], "w") as f:
    f.write(md)
  tables.write_csv(paths[1], records)
  tables.write_json(paths[2], {"command": command, "elapsed_s": elapsed_s, "runs": records,
                               "cross_seed": agg, "paper_hf_percent": PAPER_HF_PERCENT})
  plot_table1(paths[3], agg, models, alphas, n_seeds, cfg0)
  return paths + ([samples_path] if samples_path else [])


def plot_table1(path: str, agg: list[dict], models, alphas, n_seeds: int, cfg0: dict):
  """table1.png (`plots.plot_table1`) from the cross-seed aggregate; returns the figure."""
  by = {(g["model"], g["alpha"]): g for g in agg}
  stats = {m: {key: [by.get((m, a), {}).get(key) for a in alphas]
               for key, *_ in plots.TABLE1_PANELS} for m in models}
  return plots.plot_table1(
      path, alphas, stats, reference_hf=cfg0.get("hf_proportion_reference"),
      paper_hf=PAPER_HF_PERCENT,
      title=f"Table 1 vs α: top-{cfg0['hf_top_k']} word share (sampling), generative "
            f"entropy, validation perplexity (mean ± std over {n_seeds} seed(s))")


def main(argv):
  common.no_positional_args(argv)
  models, seeds, alphas = common.parse_grid(FLAGS)
  base = common.base_config(FLAGS)
  runs, summaries, elapsed = common.run_grid(base, models, seeds, alphas, FLAGS.workdir)
  extra = {"data": base.data.spec, "steps": base.train.steps,
           "hf_top_k": base.generation.hf_top_k}
  records = [sweep.run_record({**r.labels, **extra, "run_dir": os.path.relpath(s["workdir"])}, s)
             for r, s in zip(runs, summaries)]
  command = " ".join(["python experiments/table1.py"] + sys.argv[1:])
  common.write_report(write_outputs, FLAGS.workdir, records, models, seeds, alphas, elapsed,
                      command)
  return 0


if __name__ == "__main__":
  app.run(main)
