r"""The quick start with and without JAX's persistent compilation cache (issue 16, item 1).

Runs `experiments/main.py` (the README's quick start: its defaults) three times, each in a
fresh workdir: with the cache off, then twice with one new, empty cache directory (a first
run that fills it, a second that loads from it). Prints, per run, the time to the first
logged train step (process start -> first row of metrics.jsonl: imports, data, tracing,
compilation of the train step) and the total wall time, and the ratios to the cache-off run
of this same invocation.

  python benchmarks/compile_cache.py                  # the quick start (300 steps)
  python benchmarks/compile_cache.py --args=--steps=50
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
flags.DEFINE_string("args", "", "Extra flags for experiments/main.py (shell-quoted).")
FLAGS = flags.FLAGS


def timed_run(workdir: str, cache_dir: str, extra: list[str]) -> tuple[float, float]:
  """(seconds to the first metrics row, total seconds) of one main.py run."""
  cmd = [sys.executable, os.path.join(REPO, "experiments", "main.py"), f"--workdir={workdir}",
         f"--compilation_cache_dir={cache_dir}", "--progress=false", *extra]
  metrics = os.path.join(workdir, "metrics.jsonl")
  start = time.perf_counter()
  proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  first = None
  while proc.poll() is None:
    if first is None and os.path.exists(metrics) and os.path.getsize(metrics) > 0:
      first = time.perf_counter() - start
    time.sleep(0.05)
  total = time.perf_counter() - start
  if proc.returncode:
    raise SystemExit(f"error: {' '.join(cmd)} failed: {proc.stderr.read()[-2000:]}")
  return (first if first is not None else total), total


def main(argv):
  del argv
  extra = shlex.split(FLAGS.args)
  with tempfile.TemporaryDirectory() as tmp:
    cache = os.path.join(tmp, "jax_cache")
    rows = [("cache off", *timed_run(os.path.join(tmp, "off"), "", extra)),
            ("cache on, first run (fills it)", *timed_run(os.path.join(tmp, "a"), cache, extra)),
            ("cache on, second run (loads it)", *timed_run(os.path.join(tmp, "b"), cache, extra))]
  base_first, base_total = rows[0][1], rows[0][2]
  print(f"python experiments/main.py {' '.join(extra)}".strip())
  print("| run | time to first step (s) | ratio | total wall (s) | ratio |")
  print("|---|---|---|---|---|")
  for name, first, total in rows:
    print(f"| {name} | {first:.1f} | {first / base_first:.2f}x | {total:.1f} | "
          f"{total / base_total:.2f}x |")


if __name__ == "__main__":
  app.run(main)
