"""README's "TPU and GPU" guide names only flags that experiments/main.py defines."""

from __future__ import annotations

import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Flags of the other tools the guide quotes, not of experiments/main.py.
OTHER_TOOLS = {"zone": "gcloud", "worker": "gcloud", "command": "gcloud",
               "file_format": "tfds build", "data_dir": "tfds build",
               "devices": "benchmarks/memory.py"}


def guide_flags() -> set[str]:
  with open(os.path.join(REPO, "README.md")) as f:
    text = f.read()
  section = text.split("\n## TPU and GPU\n", 1)[1].split("\n## ", 1)[0]
  return set(re.findall(r"(?<![\w-])--([a-z][a-z0-9_]*)", section))


def test_every_flag_of_the_tpu_and_gpu_guide_exists():
  named = guide_flags()
  assert {"distributed", "coordinator_address", "mesh", "cache_dir", "workdir"} <= named
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, os.path.join(REPO, "experiments", "main.py"),
                        "--helpfull"], capture_output=True, text=True, timeout=120, env=env)
  defined = set(re.findall(r"^\s+--(?:\[no\])?([a-z][a-z0-9_]*)", out.stdout, re.M))
  assert "model" in defined, out.stdout[-2000:] + out.stderr[-2000:]
  missing = sorted(named - defined - set(OTHER_TOOLS))
  assert not missing, f"README's guide names flags experiments/main.py lacks: {missing}"
