"""benchmarks/accelerator.sh as written, at toy shapes on the CPU: each of its commands
accepts its flags and configuration names and prints its figures (no accelerator needed;
the timings themselves are not checked)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Stands in for `python`: the script's own command lines, with the shapes shrunk.
SHRINK = r'''
import re, runpy, sys
TOY = {"model": "gpt2_tiny", "batch_size": "2", "seq_len": "32", "steps": "1", "repeats": "1",
       "batch": "2", "prompt_len": "4", "new_tokens": "8"}
args = []
for a in sys.argv[2:]:
  m = re.match(r"--(\w+)=", a)
  args.append(f"--{m.group(1)}={TOY[m.group(1)]}" if m and m.group(1) in TOY else a)
print("RUN " + " ".join([sys.argv[1]] + args), flush=True)
sys.argv = [sys.argv[1]] + args
runpy.run_path(sys.argv[0], run_name="__main__")
'''


@pytest.mark.slow
def test_accelerator_script_runs_every_command_at_toy_shapes(tmp_path):
  shrink = tmp_path / "shrink.py"
  shrink.write_text(SHRINK)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHON=f"{sys.executable} {shrink}")
  proc = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "accelerator.sh")],
                        capture_output=True, text=True, timeout=900, env=env, cwd=str(tmp_path))
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  runs = proc.stdout.split("RUN ")[1:]
  assert [r.split()[0] for r in runs] == ["benchmarks/step.py"] * 3 + ["benchmarks/generate.py"]
  for out in runs[:3]:
    # One table row per configuration named in the script; cuDNN is GPU only.
    for name in ("plain", "+DTU keep=T/4 (all on)", "all on + PSU exact"):
      assert f"| {name} |" in out, out
    assert "skipped (a GPU with --dtype=bfloat16 or float16 only): plain + cuDNN attention" in out
    assert "bfloat16" in out
  assert "speed-up of the cache" in runs[3] and "(bfloat16)" in runs[3]
