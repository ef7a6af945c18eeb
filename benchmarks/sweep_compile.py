r"""Non-training time of a sweep's runs: this tree against a baseline commit, back to back.

Runs `experiments/table1.py` with the same flags twice, one right after the other: first
in a temporary `git worktree` of --baseline (default: the commit before alpha, the
schedule and the seed became traced arguments of the step), then in this tree. Each
starts from its own empty compilation cache and workdir, like a user's first sweep.
With few steps (the default 10) a run's wall time is almost all non-training time:
setup, tracing and compilation, evaluation and generation. Prints each run's wall time
and the sweep's, and the ratios.

  python benchmarks/sweep_compile.py
  python benchmarks/sweep_compile.py --steps=200 --seeds=2025,2026,2027   # Table 1's defaults
  python benchmarks/sweep_compile.py --steps=200 --seeds=2025,2026,2027 --baseline=5359de6

Each side runs its own table1.py defaults for everything not passed (at 5359de6: an
evaluation every 100 steps and no in-training generation, against every 10 steps with
generation now, so that baseline does less measurement work than this tree).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
flags.DEFINE_string("baseline", "7fcd10f", "The commit to compare against: 7fcd10f is the "
                    "commit before the traced scalars, 5359de6 the one issue 16 was filed at "
                    "(no persistent cache, alpha constant, 2 evaluations per 200-step run).")
flags.DEFINE_list("models", ["gpt2_tiny", "bert_tiny"], "table1.py --models.")
flags.DEFINE_list("seeds", ["2025"], "table1.py --seeds.")
flags.DEFINE_list("alphas", ["0", "0.05", "0.2"], "table1.py --alphas.")
flags.DEFINE_integer("steps", 10, "table1.py --steps.")
FLAGS = flags.FLAGS


def sweep(tree: str, scratch: str) -> dict:
  """One table1.py sweep from `tree` with a fresh cache; its wall time and its runs'."""
  workdir = os.path.join(scratch, "runs")
  script = os.path.join(tree, "experiments", "table1.py")
  cmd = [sys.executable, script,
         f"--models={','.join(FLAGS.models)}", f"--seeds={','.join(FLAGS.seeds)}",
         f"--alphas={','.join(FLAGS.alphas)}", f"--steps={FLAGS.steps}",
         f"--workdir={workdir}", f"--cache_dir={os.path.join(scratch, 'data')}"]
  env = dict(os.environ, PYTHONPATH=tree, JAX_PLATFORMS="cpu")
  # A baseline older than the persistent cache has no such flag (and no cache).
  helpfull = subprocess.run([sys.executable, script, "--helpfull"], capture_output=True,
                            text=True, cwd=tree, env=env).stdout
  if "--compilation_cache_dir" in helpfull:
    cmd.append(f"--compilation_cache_dir={os.path.join(scratch, 'jax')}")
  start = time.perf_counter()
  subprocess.run(cmd, check=True, cwd=tree, env=env, stdout=subprocess.DEVNULL)
  wall = time.perf_counter() - start
  with open(os.path.join(workdir, "table1.json")) as f:
    runs = json.load(f)["runs"]
  return {"wall_s": wall, "runs": {f"{r['model']} a{r['alpha']:g} s{r['seed']}": r["wall_s"]
                                   for r in runs}}


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as scratch:
    base_tree = os.path.join(scratch, "baseline")
    subprocess.run(["git", "-C", REPO, "worktree", "add", "--detach", base_tree,
                    FLAGS.baseline], check=True, capture_output=True)
    try:
      before = sweep(base_tree, os.path.join(scratch, "before"))
    finally:
      subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", base_tree],
                     capture_output=True)
    after = sweep(REPO, os.path.join(scratch, "after"))
  print(f"# table1.py --models={','.join(FLAGS.models)} --seeds={','.join(FLAGS.seeds)} "
        f"--alphas={','.join(FLAGS.alphas)} --steps={FLAGS.steps}; baseline {FLAGS.baseline}; "
        f"{common.machine_description()}")
  rows = [[name, f"{before['runs'][name]:.1f}", f"{after['runs'][name]:.1f}",
           f"{after['runs'][name] / before['runs'][name]:.2f}x"] for name in before["runs"]]
  med_b, med_a = (statistics.median(x["runs"].values()) for x in (before, after))
  rows.append(["median run", f"{med_b:.1f}", f"{med_a:.1f}", f"{med_a / med_b:.2f}x"])
  rows.append(["sweep (whole command)", f"{before['wall_s']:.1f}", f"{after['wall_s']:.1f}",
               f"{after['wall_s'] / before['wall_s']:.2f}x"])
  print(common.markdown_table(["run", "before s", "after s", "after/before"], rows))


if __name__ == "__main__":
  app.run(main)
