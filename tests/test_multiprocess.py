"""experiments/main.py as 2 JAX processes on one machine (gloo CPU collectives), against
1-process runs of the same config: the same losses, each process feeding its own rows,
only process 0 writing the workdir, and a 2-process checkpoint resuming in 2 and in 1.

The 1-process runs use one device (the 2-process runs have one each): the same global
batch and the same computation, sharded (fsdp=2) or not, so their losses agree up to the
order of float32 sums. (Two devices in one CPU process would need XLA's in-process
all-reduce, which deadlocked on this 2-core machine under load.)
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from test_cli import main_cmd, run_main, summary
from test_workdir import one_line_error

# One process's view of the other: the runs are float32 and their sums differ in order
# only (sharded over 2 processes or not): measured |diff| <= 4e-6 on losses of 5.5-6.8
# after 30 steps; 2e-5 relative leaves room, and is far below a step's change (~0.1).
RTOL = 2e-5
# One decoder and fewer samples than test_cli's runs (about 10 of a run's 65 CPU seconds).
ARGS = ("--decoders=sample", "--num_samples=4")
TIMEOUT = 600
# The files a run writes in its workdir besides checkpoints/ (process 0's alone).
OWN_FILES = ("config.json", "metrics.jsonl", "summary.json", "samples.txt")

# Runs experiments/main.py with a Python audit hook that logs every file this process
# opens for writing, renames, creates or removes (absolute paths, one per line), so the
# test sees what each process wrote to the shared workdir.
AUDIT = r'''
import os, runpy, sys
fd = os.open(os.environ["AUDIT_LOG"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

def log(event, path):
  if isinstance(path, (str, bytes, os.PathLike)):
    os.write(fd, f"{event} {os.path.abspath(os.fsdecode(path))}\n".encode())

def hook(event, args):
  if event == "open":
    path, mode, flags = args
    if (mode and any(c in mode for c in "wax+")) or (mode is None and flags & WRITE):
      log(event, path)
  elif event == "os.rename":
    log(event, args[1])
  elif event in ("os.mkdir", "os.remove", "os.rmdir", "os.truncate", "shutil.rmtree"):
    log(event, args[0])

sys.addaudithook(hook)
main = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(main, run_name="__main__")
'''


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_two(workdir, logs, *args):
  """2 processes of experiments/main.py on one workdir; [(returncode, stdout, stderr,
  audit log path)] per process."""
  os.makedirs(logs, exist_ok=True)
  wrapper = os.path.join(logs, "audit.py")
  with open(wrapper, "w") as f:
    f.write(AUDIT)
  port = free_port()
  procs, out = [], []
  try:
    for i in range(2):
      cmd = main_cmd(workdir, *ARGS, *args, f"--coordinator_address=127.0.0.1:{port}",
                     "--num_processes=2", f"--process_id={i}")
      cmd[1:1] = [wrapper]
      log = os.path.join(logs, f"audit{i}.log")
      env = dict(os.environ, JAX_PLATFORMS="cpu", AUDIT_LOG=log)
      env.pop("XLA_FLAGS", None)
      procs.append((subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env), log))
    for p, log in procs:
      stdout, stderr = p.communicate(timeout=TIMEOUT)
      out.append((p.returncode, stdout, stderr, log))
  finally:
    for p, _ in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for rc, _, stderr, _ in out:
    assert rc == 0, stderr[-3000:]
  return out


def run_one(workdir, *args):
  proc = run_main(workdir, *ARGS, *args, timeout=TIMEOUT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def train_rows(workdir):
  return [r for r in rows(workdir) if "nll" in r]


def back_to_step(src, dst, step):
  """A copy of a finished workdir as if the run had stopped right after checkpoint `step`."""
  shutil.copytree(src, dst)
  ckpt = os.path.join(dst, "checkpoints")
  for name in os.listdir(ckpt):
    if name.isdigit() and int(name) > step:
      shutil.rmtree(os.path.join(ckpt, name))
  for name in ("summary.json", "samples.txt"):
    os.remove(os.path.join(dst, name))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("mp")
  out = {"root": root, "one": root / "one", "two": root / "two"}
  out["one_proc"] = run_one(out["one"])
  out["two_procs"] = run_two(out["two"], root / "logs-two")
  return out


def resume(runs, name, run):
  """The 2-process run's step-10 checkpoint resumed by `run` (run_one or run_two)."""
  wd = runs["root"] / name
  back_to_step(runs["two"], wd, 10)
  if run is run_two:
    run_two(wd, runs["root"] / f"logs-{name}")
  else:
    run_one(wd)
  return wd


def test_two_processes_train_like_one(runs):
  one, two = train_rows(runs["one"]), train_rows(runs["two"])
  assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(5, 31, 5))
  np.testing.assert_allclose([r["nll"] for r in two], [r["nll"] for r in one], rtol=RTOL)
  val = lambda wd: [r["val_loss"] for r in rows(wd) if "val_loss" in r]  # noqa: E731
  np.testing.assert_allclose(val(runs["two"]), val(runs["one"]), rtol=RTOL)
  s1, s2 = summary(runs["one"]), summary(runs["two"])
  assert s2["status"] == "finished" and s2["step"] == 30
  # The same samples from the same prompts and keys (generation on each process's copy).
  for k in ("hf_proportion", "length_mean", "no_eos_share"):
    assert s2["generation"]["sample"][k] == s1["generation"]["sample"][k], k


def test_each_process_feeds_only_its_rows(runs):
  # 'tokens' counts the target tokens of the global batch the step saw: had each process
  # fed the whole batch, the global array would hold every row twice (the same mean loss,
  # twice the tokens).
  one, two = train_rows(runs["one"]), train_rows(runs["two"])
  assert [r["tokens"] for r in two] == [r["tokens"] for r in one]
  assert len({r["tokens"] for r in one}) > 1  # batches differ: a real comparison


def test_only_process_zero_writes_the_workdir(runs):
  wd = str(runs["two"])
  written = []
  for _, _, _, log in runs["two_procs"]:
    with open(log) as f:
      paths = {line.split(" ", 1)[1].strip() for line in f}
    written.append({os.path.relpath(p, wd) for p in paths
                    if p == wd or p.startswith(wd + os.sep)})
  ckpt = lambda p: p.split(os.sep)[0] == "checkpoints"  # noqa: E731
  # Process 0 wrote every file (the hook sees the writes), process 1 none outside the
  # checkpoints (orbax has each process write its own shards).
  for name in OWN_FILES:
    assert any(p == name or p.startswith(name + ".") for p in written[0]), (name, written[0])
  assert any(p.startswith("tb" + os.sep) for p in written[0])
  assert not [p for p in written[1] if not ckpt(p)], written[1]
  # One writer: each step once in metrics.jsonl, one TensorBoard event file.
  train = [r["step"] for r in train_rows(wd)]
  assert train == sorted(set(train))
  assert len(os.listdir(os.path.join(wd, "tb"))) == 1
  # One report, from process 0.
  (_, out0, _, _), (_, out1, _, _) = runs["two_procs"]
  assert "workdir:" in out0 and "workdir:" not in out1


def test_checkpoint_of_two_processes_resumes_in_one(runs):
  # One process, one device (the state restored into another sharding): the same data
  # from the restored iterator position (tokens per batch) and the same losses as the
  # uninterrupted runs.
  wd = resume(runs, "resumed1", run_one)
  got = train_rows(wd)
  for ref in (train_rows(runs["one"]), train_rows(runs["two"])):
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    assert [r["tokens"] for r in got] == [r["tokens"] for r in ref]
    np.testing.assert_allclose([r["nll"] for r in got], [r["nll"] for r in ref], rtol=RTOL)
  assert summary(wd)["status"] == "finished"


@pytest.mark.slow  # 2 more processes, about 2 CPU minutes
def test_checkpoint_of_two_processes_resumes_in_two(runs):
  # Same processes, same devices: the uninterrupted summary, bit for bit.
  wd = resume(runs, "resumed2", run_two)
  assert summary(wd) == summary(runs["two"])


@pytest.mark.parametrize("args,named", [
    (("--coordinator_address=127.0.0.1:1234",), "--num_processes, --process_id"),
    (("--coordinator_address=127.0.0.1:1234", "--num_processes=2", "--process_id=2"),
     "--process_id=2"),
    (("--coordinator_address=localhost", "--num_processes=2", "--process_id=0"),
     "HOST:PORT"),
])
def test_bad_coordinator_flags_are_one_line(tmp_path, args, named):
  proc = run_main(tmp_path / "run", *args, timeout=120)
  one_line_error(proc, named, "accepted")
  assert not (tmp_path / "run").exists()
