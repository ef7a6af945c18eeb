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


def launcher_commands(*docs: str) -> dict[str, set[str]]:
  """{experiments/X.py: flags it is given} over every `python experiments/X.py ...` command
  of the docs (code blocks with '\\' continuations, and inline code spans)."""
  out: dict[str, set[str]] = {}
  for doc in docs:
    with open(os.path.join(REPO, doc)) as f:
      text = f.read()
    parts = text.split("```")  # odd parts are code blocks; in prose, a command may wrap
    parts[::2] = [re.sub(r"`[^`]*python experiments/[^`]*`",
                         lambda m: m.group(0).replace("\n", " "), p) for p in parts[::2]]
    text = "```".join(parts).replace("\\\n", " ")
    for script, args in re.findall(r"python (experiments/\w+\.py)([^\n]*)", text):
      args = re.split(r"[`|#]", args, maxsplit=1)[0]
      out.setdefault(script, set()).update(re.findall(r"(?<![\w-])--([a-z][a-z0-9_]*)", args))
  return out


def test_every_launcher_command_of_the_docs_names_its_own_flags():
  commands = launcher_commands("README.md", "REPRODUCTION.md")
  assert {"experiments/main.py", "experiments/table1.py", "experiments/export.py"} <= set(commands)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  problems = []
  for script, named in sorted(commands.items()):
    path = os.path.join(REPO, script)
    if not os.path.exists(path):
      problems.append(f"{script} does not exist")
      continue
    out = subprocess.run([sys.executable, path, "--helpfull"], capture_output=True, text=True,
                         timeout=120, env=env)
    defined = set(re.findall(r"^\s+--(?:\[no\])?([a-z][a-z0-9_]*)", out.stdout, re.M))
    assert defined, out.stdout[-2000:] + out.stderr[-2000:]
    missing = sorted(f for f in named - defined
                     if not (f.startswith("no") and f[2:] in defined))
    if missing:
      problems.append(f"{script}: {missing}")
  assert not problems, f"the docs give launchers flags they lack: {problems}"
