r"""Scale trend (issue 12 item 4): the Table 1 sweep over GPT-2 sizes about 4x apart.

Does the effect of alpha on the generated text grow or shrink with the model? Every size
trains on the same token stream (same steps, batch, sequence length, seed, data order),
so the sizes differ only in their parameters. Same run flags, reuse and resume as Table 1.

  python experiments/scale.py                       # gpt2_nano/tiny/mini, seed 2025
  python experiments/scale.py --seeds=2025,2026 --steps=600 --workdir=runs/scale_600

Writes WORKDIR/scale.md, scale.csv, scale.json and scale.png (HF proportion vs alpha, one
line per size).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import common  # noqa: E402
from stabjax import plots, sweep, tables  # noqa: E402
from stabjax.metrics.aggregate import seed_aggregate  # noqa: E402

FLAGS = flags.FLAGS
common.define_run_flags()
common.define_sweep_flags(models=["gpt2_nano", "gpt2_tiny", "gpt2_mini"], seeds=[2025],
                          alphas=["0", "0.05", "0.2"], workdir="runs/scale")
flags.adopt_module_key_flags(common)  # --helpshort lists the run flags
FLAGS.set_default("steps", 300)
FLAGS.set_default("progress", False)
# Every 10 steps: the in-training HF proportion has enough points for its plateau (and
# table1, ablation and mechanism runs stay one config, so they are reused across them).
FLAGS.set_default("eval_every", 10)

# (record key, column title, shown as a percentage)
COLUMNS = (("hf_proportion", "HF prop. (sampling)", True),
           ("greedy/hf_proportion", "HF prop. (greedy)", True),
           ("generative_entropy", "gen. entropy (nats/token)", False),
           ("val_ppl", "val ppl", False))


def param_label(n: int) -> str:
  """1234567 -> '1.23M params'."""
  for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
    if n >= div:
      return f"{n / div:.3g}{unit} params"
  return f"{n} params"


def alpha_effects(agg: list[dict], models, alphas) -> dict[str, float | None]:
  """Per model: mean HF proportion (sampling) at the largest alpha minus at the smallest."""
  by = {(g["model"], g["alpha"]): g for g in agg}
  lo, hi = min(alphas), max(alphas)
  out = {}
  for m in models:
    a, b = by.get((m, lo), {}).get("hf_proportion"), by.get((m, hi), {}).get("hf_proportion")
    out[m] = None if a is None or b is None or lo == hi else b[0] - a[0]
  return out


def write_outputs(workdir: str, records: list[dict], models, alphas, params: dict[str, int],
                  elapsed_s: float, command: str) -> list[str]:
  """scale.md/.csv/.json/.png in `workdir`; returns their paths."""
  keys = [k for k, _, _ in COLUMNS]
  agg = seed_aggregate(records, ["model", "alpha"], keys)
  by = {(g["model"], g["alpha"]): g for g in agg}
  n_seeds = len({r["seed"] for r in records})
  cfg0 = records[0]
  rows = [[m, f"{params[m]:,}", f"{a:g}", str(by[m, a]["n"])]
          + [tables.fmt_mean_std(by[m, a].get(k), percent=pct) for k, _, pct in COLUMNS]
          for m in models for a in alphas]
  effects = alpha_effects(agg, models, alphas)
  lo, hi = min(alphas), max(alphas)
  effect_rows = [[m, f"{params[m]:,}",
                  "—" if effects[m] is None else f"{100 * effects[m]:+.1f} points"]
                 for m in models]
  tokens = cfg0["steps"] * cfg0["batch_size"] * cfg0["seq_len"]
  md = "\n".join([
      "# Scale trend: the alpha effect across GPT-2 sizes (issue 12 item 4)", "",
      f"Command: `{command}`  ",
      f"Data: `{cfg0['data']}`; {len(records)} runs; "
      f"{tables.wall_time_note(records, elapsed_s)}", "",
      f"Every size sees the same tokens: {cfg0['steps']} steps × batch {cfg0['batch_size']} "
      f"× {cfg0['seq_len']} tokens = {tokens:,} training tokens, in the same order for a "
      "given seed; the sizes differ only in their parameters (counted at the run's "
      "vocabulary). Cells: mean ± std over "
      f"{n_seeds} seed(s); HF prop.: share of generated words among the "
      f"top-{cfg0['hf_top_k']} training-corpus words.", "",
      tables.markdown_table(["model", "parameters", "α", "seeds"] + [t for _, t, _ in COLUMNS],
                            rows), "",
      f"## The α effect: HF proportion (sampling) at α={hi:g} minus at α={lo:g}", "",
      tables.markdown_table(["model", "parameters", f"HF(α={hi:g}) − HF(α={lo:g})"],
                            effect_rows), "",
      "![scale](scale.png)", "",
  ])
  paths = [os.path.join(workdir, f"scale.{ext}") for ext in ("md", "csv", "json", "png")]
  with open(paths[0], "w") as f:
    f.write(md)
  tables.write_csv(paths[1], records)
  tables.write_json(paths[2], {"command": command, "elapsed_s": elapsed_s, "runs": records,
                               "cross_seed": agg, "params": params, "tokens_per_run": tokens,
                               "alpha_effect": {"alpha_low": lo, "alpha_high": hi,
                                                "hf_proportion": effects}})
  series = {}
  for m in models:
    stats = [by[m, a].get("hf_proportion") or (float("nan"), float("nan")) for a in alphas]
    series[f"{m} ({param_label(params[m])})"] = ([s[0] for s in stats], [s[1] for s in stats])
  ref = cfg0.get("hf_proportion_reference")
  if ref is not None:
    series["held-out reference"] = ([ref] * len(alphas), None)
  plots.plot_lines(paths[3], alphas, series, xlabel="feedback strength α",
                   ylabel="HF word proportion, sampling (%)", percent=True, ylim=(0.0, 100.0),
                   figsize=(6.5, 4.0),
                   title=f"Scale trend: top-{cfg0['hf_top_k']} word share vs α\n"
                         f"({tokens:,} tokens per size; mean ± std over {n_seeds} seed(s))")
  return paths


def main(argv):
  common.no_positional_args(argv)
  models, seeds, alphas = common.parse_grid(FLAGS)
  base = common.base_config(FLAGS)
  runs, summaries, elapsed = common.run_grid(base, models, seeds, alphas, FLAGS.workdir)
  t = base.train
  extra = {"data": base.data.spec, "steps": t.steps, "batch_size": t.batch_size,
           "seq_len": t.seq_len, "hf_top_k": base.generation.hf_top_k}
  params = {}
  for r, s in zip(runs, summaries):
    params.setdefault(r.labels["model"], sweep.run_param_count(s, r.cfg.model))
  records = [sweep.run_record({**r.labels, **extra, "params": params[r.labels["model"]]}, s)
             for r, s in zip(runs, summaries)]
  command = " ".join(["python experiments/scale.py"] + sys.argv[1:])
  common.write_report(write_outputs, FLAGS.workdir, records, models, alphas, params, elapsed,
                      command)
  return 0


if __name__ == "__main__":
  app.run(main)
