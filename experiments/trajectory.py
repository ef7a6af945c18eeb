r"""The paper's Figure 3: the joint trajectory of training loss and generative entropy.

One run per alpha (the Table 1 sweep: same run flags, reuse and resume; one model, one
seed). At every evaluation step (--eval_every, default 5 here) training samples a small
generation batch and logs its generative entropy (`gen/generative_entropy`); the figure
puts it against the training loss of the same step, as the paper's Figure 3 does: the
first alpha as a 2-D density heatmap, the other alphas as density contours. The batch
predictive entropy H(B_t), logged at every step (--log_every=1), gets the same figure.

  python experiments/trajectory.py                  # gpt2_tiny, seed 2025, alpha 0 and 0.2
  python experiments/trajectory.py --alphas=0.05 --steps=600 --workdir=runs/trajectory_long
  python experiments/trajectory.py --loss_key=loss   # x = the objective, feedback included

Writes WORKDIR/trajectory.md, trajectory.json, trajectory.png (generative entropy) and
trajectory_predictive.png (H(B_t)).
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import common  # noqa: E402
from stabjax import plots, run, sweep, tables  # noqa: E402
from stabjax.metrics.aggregate import split_slopes  # noqa: E402

FLAGS = flags.FLAGS
common.define_run_flags()
common.define_sweep_flags(models=["gpt2_tiny"], seeds=[2025], alphas=["0", "0.2"],
                          workdir="runs/trajectory")
flags.adopt_module_key_flags(common)  # --helpshort lists the run flags
# 'nll' by default: the objective 'loss' adds alpha times the feedback term, which would
# shift each alpha's cloud along x and make the overlays incomparable.
flags.DEFINE_string("loss_key", "nll", "Logged training loss on the x axis: 'nll' (the MLE "
                    "part) or 'loss' (the objective, MLE + alpha feedback).")
FLAGS.set_default("steps", 200)  # Table 1's, so the alpha=0 run matches its setting
FLAGS.set_default("progress", False)
FLAGS.set_default("log_every", 1)
FLAGS.set_default("eval_every", 5)  # 40 points of generative entropy over 200 steps

GEN_KEY = "gen/generative_entropy"


def trajectory_points(history: list[dict], loss_key: str) -> tuple[list[float], list[float]]:
  """(loss, H(B_t)) of every logged training step (evaluation rows have neither)."""
  rows = [r for r in history if loss_key in r and "entropy" in r]
  return [r[loss_key] for r in rows], [r["entropy"] for r in rows]


def generative_points(history: list[dict], loss_key: str) -> tuple[list[float], list[float]]:
  """(training loss, generative entropy) at every evaluation step that logged both: the
  generation row joined with the training row of the same step."""
  loss_at = {r["step"]: r[loss_key] for r in history if r.get(loss_key) is not None}
  pts = [(loss_at[r["step"]], r[GEN_KEY]) for r in history
         if r.get(GEN_KEY) is not None and r["step"] in loss_at]
  return [x for x, _ in pts], [y for _, y in pts]


def main(argv):
  common.no_positional_args(argv)
  models, seeds, alphas = common.parse_grid(FLAGS)
  if len(models) != 1 or len(seeds) != 1:
    common.fail("--models and --seeds take one value each here (one trajectory per alpha)")
  if FLAGS.loss_key not in ("loss", "nll"):
    common.fail(f"--loss_key={FLAGS.loss_key!r} is not accepted; accepted: loss, nll")
  model, seed = models[0], seeds[0]
  base = common.base_config(FLAGS)
  runs = [sweep.SweepRun(sweep.run_name(model, seed, a),
                         sweep.override_config(base, model=model, seed=seed, alpha=a),
                         {"model": model, "seed": seed, "alpha": a}) for a in alphas]
  os.makedirs(FLAGS.workdir, exist_ok=True)
  start = time.perf_counter()
  summaries = common.sweep(runs, FLAGS.workdir)
  elapsed = time.perf_counter() - start

  gen = {a: generative_points(s["history"], FLAGS.loss_key) for a, s in zip(alphas, summaries)}
  missing = [sweep.run_name(model, seed, a) for a, (x, _) in gen.items() if len(x) < 2]
  if missing:
    common.fail(f"{', '.join(missing)} in {FLAGS.workdir} logged fewer than 2 points of "
                f"{GEN_KEY} (trained before it was logged, or --eval_every too large); rerun "
                "with a new --workdir", code=1)
  if not run.is_primary():  # its outputs are process 0's, as common.write_report's are
    return 0
  pred = {a: trajectory_points(s["history"], FLAGS.loss_key) for a, s in zip(alphas, summaries)}
  rows, stats = [], []
  for a, s in zip(alphas, summaries):
    (gl, ge), (pl, pe) = gen[a], pred[a]
    gs, ps = split_slopes(gl, ge), split_slopes(pl, pe)
    rec = sweep.run_record({"alpha": a}, s)
    stats.append({"alpha": a, "eval_points": len(gl), "steps": len(pl),
                  "generative": gs, "predictive": ps, "wall_s": rec.get("wall_s"),
                  "hf_proportion": rec.get("hf_proportion"),
                  "generative_entropy": rec.get("generative_entropy")})
    for name, (x, y), sl in (("generative entropy", (gl, ge), gs),
                             ("predictive H(B_t)", (pl, pe), ps)):
      rows.append([f"{a:g}", name, str(len(x)), f"{x[0]:.3f} → {x[-1]:.3f}",
                   f"{y[0]:.3f} → {y[-1]:.3f}", sl["median_loss"], sl["slope_high_loss"],
                   sl["slope_low_loss"], tables.fmt_percent(rec.get("hf_proportion"))])
  loss_name = {"loss": "training loss (MLE + α feedback)", "nll": "training NLL"}[FLAGS.loss_key]
  command = " ".join(["python experiments/trajectory.py"] + sys.argv[1:])
  md_path, json_path, png_path, pred_path = (
      os.path.join(FLAGS.workdir, f"trajectory{x}") for x in (".md", ".json", ".png",
                                                              "_predictive.png"))
  t = base.train
  md = "\n".join([
      "# Figure 3: loss / entropy trajectory (paper section 6.4)", "",
      f"Command: `{command}`  ",
      f"Model {model}, seed {seed}, data `{base.data.spec}`, {t.steps} steps, training "
      f"logged every {t.log_every} step(s), generation measured every {t.eval_every} steps; "
      f"{tables.wall_time_note([{'wall_s': st['wall_s']} for st in stats], elapsed)}", "",
      f"**trajectory.png** (the paper's Figure 3): x = {loss_name} of the step's batch "
      f"(nats/token); y = generative entropy ({GEN_KEY}: mean entropy of the next-token "
      f"distribution along {base.generation.eval_gen_prompts} sampled continuations of "
      f"{base.generation.eval_gen_tokens} tokens, nats/token), at every evaluation step. "
      "**trajectory_predictive.png**: y = predictive entropy H(B_t) of the model on the "
      "training batch (the quantity the feedback acts on), at every logged step. Heatmaps: "
      f"α={alphas[0]:g}, colour = number of points per bin; contours: the other α.", "",
      "The paper's claim: at high loss the entropy falls steeply with the loss, at low loss "
      "the relation flattens. Measured: the least-squares slope dH/dloss over the points "
      "above and below the median loss (a larger slope above than below agrees with it).",
      "",
      tables.markdown_table(["α", "y", "points", "loss first → last", "y first → last",
                             "median loss", "dH/dloss (high loss)", "dH/dloss (low loss)",
                             "HF prop. (final, sampling)"], rows), "",
      "![trajectory](trajectory.png)", "",
      "![predictive entropy trajectory](trajectory_predictive.png)", "",
  ])
  with open(md_path, "w") as f:
    f.write(md)
  tables.write_json(json_path, {
      "command": command, "elapsed_s": elapsed, "loss_key": FLAGS.loss_key, "runs": stats,
      "points": {f"{a:g}": {"loss": pred[a][0], "entropy": pred[a][1],
                            "eval_loss": gen[a][0], "generative_entropy": gen[a][1]}
                 for a in alphas}})
  first = alphas[0]
  bins = max(6, min(30, round(len(gen[first][0]) ** 0.5 * 2)))
  plots.plot_density(
      png_path, *gen[first], xlabel=f"{loss_name} (nats/token)",
      ylabel="generative entropy (nats/token)", bins=bins,
      title=f"Figure 3: {model}, heatmap α={first:g}",
      contours={f"α={a:g} (contours)": gen[a] for a in alphas[1:]})
  plots.plot_density(
      pred_path, *pred[first], xlabel=f"{loss_name} (nats/token)",
      ylabel="predictive entropy H(B_t) (nats/token)",
      title=f"{model}: predictive entropy, heatmap α={first:g}",
      contours={f"α={a:g} (contours)": pred[a] for a in alphas[1:]})
  print(md)
  print(f"wrote {md_path}, {json_path}, {png_path}, {pred_path}")
  return 0


if __name__ == "__main__":
  app.run(main)
