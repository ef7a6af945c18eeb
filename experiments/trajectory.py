r"""The paper's Figure 3: the joint trajectory of training loss and predictive entropy.

One run per alpha (the Table 1 sweep of experiments/table1.py: same flags, reuse and
resume; one model, one seed), logged at every step (--log_every=1). The first alpha's
steps are drawn as a 2-D density heatmap of (training loss, batch predictive entropy
H(B_t)); the other alphas are overlaid as density contours.

  python experiments/trajectory.py                  # gpt2_tiny, seed 2025, alpha 0 and 0.2
  python experiments/trajectory.py --alphas=0.05 --steps=600 --workdir=runs/trajectory_long
  python experiments/trajectory.py --loss_key=loss   # x = the objective, feedback included

Writes WORKDIR/trajectory.md, trajectory.json and trajectory.png.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import common, table1  # noqa: E402
from stabjax import report  # noqa: E402

FLAGS = flags.FLAGS
# 'nll' by default: the objective 'loss' adds alpha times the feedback term, which would
# shift each alpha's cloud along x and make the overlays incomparable.
flags.DEFINE_string("loss_key", "nll", "Logged training loss on the x axis: 'nll' (the MLE "
                    "part) or 'loss' (the objective, MLE + alpha feedback).")
FLAGS.set_default("models", ["gpt2_tiny"])
FLAGS.set_default("seeds", ["2025"])
FLAGS.set_default("alphas", ["0", "0.2"])
FLAGS.set_default("workdir", "runs/trajectory")
FLAGS.set_default("log_every", 1)


def trajectory_points(history: list[dict], loss_key: str) -> tuple[list[float], list[float]]:
  """(loss, entropy) of every logged training step (evaluation rows have neither)."""
  rows = [r for r in history if loss_key in r and "entropy" in r]
  return [r[loss_key] for r in rows], [r["entropy"] for r in rows]


def main(argv):
  if len(argv) > 1:
    common.fail(f"unexpected arguments {argv[1:]}; all options are --flags (see --helpshort)")
  models, seeds, alphas = table1.parse_grid(FLAGS)
  if len(models) != 1 or len(seeds) != 1:
    common.fail("--models and --seeds take one value each here (one trajectory per alpha)")
  if FLAGS.loss_key not in ("loss", "nll"):
    common.fail(f"--loss_key={FLAGS.loss_key!r} is not accepted; accepted: loss, nll")
  model, seed = models[0], seeds[0]
  base = table1.base_config(FLAGS)
  runs = [report.SweepRun(report.run_name(model, seed, a),
                          report.override_config(base, model=model, seed=seed, alpha=a),
                          {"model": model, "seed": seed, "alpha": a}) for a in alphas]
  os.makedirs(FLAGS.workdir, exist_ok=True)
  start = time.perf_counter()
  summaries = table1.sweep(runs, FLAGS.workdir)
  elapsed = time.perf_counter() - start

  points = {a: trajectory_points(s["history"], FLAGS.loss_key) for a, s in zip(alphas, summaries)}
  rows, stats = [], []
  for (a, (loss, ent)), s in zip(points.items(), summaries):
    sl = report.split_slopes(loss, ent)
    rec = report.run_record({"alpha": a}, s)
    stats.append({"alpha": a, "steps": len(loss), **sl, "wall_s": rec.get("wall_s"),
                  "hf_proportion": rec.get("hf_proportion"),
                  "generative_entropy": rec.get("generative_entropy")})
    rows.append([f"{a:g}", str(len(loss)), f"{loss[0]:.3f} → {loss[-1]:.3f}",
                 f"{ent[0]:.3f} → {ent[-1]:.3f}", sl["median_loss"], sl["slope_high_loss"],
                 sl["slope_low_loss"], report.fmt_percent(rec.get("hf_proportion"))])
  loss_name = {"loss": "training loss (MLE + α feedback)", "nll": "training NLL"}[FLAGS.loss_key]
  command = " ".join(["python experiments/trajectory.py"] + sys.argv[1:])
  md_path, json_path, png_path = (os.path.join(FLAGS.workdir, f"trajectory.{e}")
                                  for e in ("md", "json", "png"))
  md = "\n".join([
      "# Figure 3: loss / entropy trajectory (paper section 6.4)", "",
      f"Command: `{command}`  ",
      f"Model {model}, seed {seed}, data `{base.data.spec}`, {base.train.steps} steps, logged "
      f"every {base.train.log_every} step(s); "
      f"{report.wall_time_note([{'wall_s': st['wall_s']} for st in stats], elapsed)}", "",
      f"x: {loss_name} of the step's batch (nats/token); y: predictive entropy H(B_t) of the "
      "model on that batch (nats/token, the quantity the feedback acts on). Heatmap: "
      f"α={alphas[0]:g}, colour = number of steps per bin; contours: the other α.", "",
      "The paper's claim: at high loss the entropy falls steeply with the loss, at low loss "
      "the relation flattens. Measured: the least-squares slope dH/dloss over the steps "
      "above and below the median loss (a larger slope above than below agrees with it).",
      "",
      report.markdown_table(["α", "steps", "loss first → last", "H(B_t) first → last",
                             "median loss", "dH/dloss (high loss)", "dH/dloss (low loss)",
                             "HF prop. (generated)"], rows), "",
      "![trajectory](trajectory.png)", "",
  ])
  with open(md_path, "w") as f:
    f.write(md)
  report.write_json(json_path, {"command": command, "elapsed_s": elapsed, "loss_key":
                                FLAGS.loss_key, "runs": stats,
                                "points": {f"{a:g}": {"loss": l, "entropy": e}
                                           for a, (l, e) in points.items()}})
  first = alphas[0]
  report.plot_density(
      png_path, *points[first], xlabel=f"{loss_name} (nats/token)",
      ylabel="predictive entropy H(B_t) (nats/token)",
      title=f"Figure 3: {model}, heatmap α={first:g}",
      contours={f"α={a:g} (contours)": points[a] for a in alphas[1:]})
  print(md)
  print(f"wrote {md_path}, {json_path}, {png_path}")
  return 0


if __name__ == "__main__":
  app.run(main)
