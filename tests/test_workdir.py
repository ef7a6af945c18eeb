"""A workdir that cannot be corrupted: changed settings, corrupt checkpoints, a second run,
a full disk. Each bad case ends with one line, a non-zero exit, no traceback, and the
earlier checkpoints and files unchanged."""

from __future__ import annotations

import glob
import hashlib
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys

import pytest

from test_cli import _wait_for_checkpoint, main_cmd, run_main, summary


def snapshot(workdir) -> dict[str, str]:
  """sha1 of every file under the workdir except the lock file."""
  out = {}
  for path in sorted(glob.glob(os.path.join(str(workdir), "**", "*"), recursive=True)):
    if os.path.isfile(path) and not path.endswith(".lock"):
      with open(path, "rb") as f:
        out[os.path.relpath(path, str(workdir))] = hashlib.sha1(f.read()).hexdigest()
  return out


def one_line_error(proc, *needles):
  assert proc.returncode not in (0, None), proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  for n in needles:
    assert n in lines[0], lines[0]


def corrupt(checkpoint_dir):
  """Truncate every file of a checkpoint's state item (a partial or damaged write)."""
  for path in glob.glob(os.path.join(str(checkpoint_dir), "state", "**", "*"), recursive=True):
    if os.path.isfile(path):
      open(path, "w").close()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished 30-step run (checkpoints 10, 20, 30) and its summary."""
  wd = tmp_path_factory.mktemp("wd") / "run"
  proc = run_main(wd)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return wd, summary(wd)


def test_resuming_with_other_training_settings_is_refused_and_writes_nothing(finished):
  wd, _ = finished
  before = snapshot(wd)
  proc = run_main(wd, "--alpha=0.2", "--c_tilde=0.25")
  one_line_error(proc, "train.alpha", "model.dmu.c_tilde", "another --workdir")
  assert snapshot(wd) == before


def test_changing_only_evaluation_settings_is_allowed_and_recorded(tmp_path, finished):
  wd, ref = finished
  import shutil
  copy = tmp_path / "copy"
  shutil.copytree(wd, copy)
  proc = run_main(copy, "--num_samples=4", "--hf_top_k=10")
  assert proc.returncode == 0, proc.stderr[-2000:]
  with open(copy / "resumes.jsonl") as f:
    text = f.read()
  assert "generation.num_samples" in text and "generation.hf_top_k" in text
  # Training was not repeated: the logged history is the finished run's.
  assert summary(copy)["history"] == ref["history"]


def test_corrupt_newest_checkpoints_are_moved_aside_and_the_run_resumes_exactly(tmp_path,
                                                                                finished):
  wd, ref = finished
  import shutil
  copy = tmp_path / "copy"
  shutil.copytree(wd, copy)
  os.remove(copy / "summary.json")
  corrupt(copy / "checkpoints" / "30")
  corrupt(copy / "checkpoints" / "20")
  proc = run_main(copy)
  assert proc.returncode == 0, proc.stderr[-3000:]
  warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
  assert len(warnings) == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert sorted(os.listdir(copy / "checkpoints_corrupt")) == ["20", "30"]
  # Resumed from step 10 and trained 11..30 again: the uninterrupted run's result, exactly.
  assert summary(copy) == ref


def test_no_intact_checkpoint_is_one_line_and_keeps_them_aside(tmp_path, finished):
  wd, _ = finished
  import shutil
  copy = tmp_path / "copy"
  shutil.copytree(wd, copy)
  for step in ("10", "20", "30"):
    corrupt(copy / "checkpoints" / step)
  proc = run_main(copy)
  assert proc.returncode == 1
  errors = [line for line in proc.stderr.splitlines() if not line.startswith("warning:")]
  assert len(errors) == 1 and "no intact checkpoint" in errors[0], proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  assert sorted(os.listdir(copy / "checkpoints_corrupt")) == ["10", "20", "30"]


def test_a_second_run_on_a_live_workdir_is_refused_and_a_killed_run_leaves_no_lock(tmp_path):
  wd = tmp_path / "live"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cmd = main_cmd(wd, "--steps=100000", "--checkpoint_every=10")
  first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           env=env)
  try:
    _wait_for_checkpoint(first, wd / "checkpoints", 10)
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    one_line_error(second, "in use by another run", f"pid {first.pid}")
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait()
  # The kernel released the killed run's lock: the same command resumes. The first run
  # kept training while the second was refused, so wait for a checkpoint newer than any it
  # left (one it left would exist before the third run handles SIGTERM).
  done = [int(d) for d in os.listdir(wd / "checkpoints") if d.isdigit()]
  third = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=env)
  try:
    _wait_for_checkpoint(third, wd / "checkpoints", max(done) + 10)
  finally:
    third.send_signal(signal.SIGTERM)
    out, err = third.communicate(timeout=120)
  assert third.returncode == 0 and "preempted" in out, err[-2000:]


def killed_after_checkpoint_10(wd, env) -> None:
  """A run on `wd` SIGKILLed once its checkpoint 10 exists (the state a crash leaves)."""
  first = subprocess.Popen(main_cmd(wd), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True, env=env)
  _wait_for_checkpoint(first, wd / "checkpoints", 10)
  first.send_signal(signal.SIGKILL)
  first.wait()


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_the_last_checkpoint_stays_intact(tmp_path):
  wd, env = tmp_path / "full", dict(os.environ, JAX_PLATFORMS="cpu")
  killed_after_checkpoint_10(wd, env)
  kept = snapshot(wd / "checkpoints" / "10")

  def small_files():  # files may not grow past 200 kB: a disk that fills up mid-run
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

  proc = subprocess.run(main_cmd(wd), capture_output=True, text=True, timeout=300, env=env,
                        preexec_fn=small_files)
  one_line_error(proc, "cannot write")
  assert snapshot(wd / "checkpoints" / "10") == kept
  # And the run resumes from it once there is room again.
  proc = run_main(wd)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert sys.platform != "win32"


def _read_only_cmd(path, cmd):
  """`cmd` in a private mount namespace where `path` is bind-mounted read-only (a
  read-only disk that root cannot write either); None where namespaces are unavailable."""
  probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
  if shutil.which("unshare") is None or probe.returncode != 0:
    return None
  p = shlex.quote(str(path))
  return ["unshare", "-m", "sh", "-c", f"mount --bind {p} {p} && mount -o remount,bind,ro "
          f"{p} {p} && exec {shlex.join(cmd)}"]


@pytest.mark.parametrize("what", ["workdir", "checkpoints"])
def test_a_read_only_disk_is_one_line_and_changes_nothing(tmp_path, what):
  """A read-only workdir (refused before training), or only its checkpoints (the next
  save fails): one line naming the path, exit 1, every earlier file unchanged."""
  wd, env = tmp_path / "ro", dict(os.environ, JAX_PLATFORMS="cpu")
  killed_after_checkpoint_10(wd, env)
  before = snapshot(wd)
  cmd = _read_only_cmd(wd if what == "workdir" else wd / "checkpoints", main_cmd(wd))
  if cmd is None:
    pytest.skip("no mount namespaces here (unshare -m) to make a read-only disk")
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
  one_line_error(proc, "Read-only file system", str(wd))
  if what == "workdir":
    assert snapshot(wd) == before
  else:  # training ran until the save: only the log files grew
    after = snapshot(wd)
    assert {k: v for k, v in after.items() if k.startswith("checkpoints")} == \
        {k: v for k, v in before.items() if k.startswith("checkpoints")}


def test_a_workdir_written_before_a_setting_existed_resumes_at_its_default(tmp_path, finished):
  """config.json without a key (a setting added since): equal at the default, refused
  when the new run sets it otherwise."""
  wd, ref = finished
  import json
  import shutil
  copy = tmp_path / "old"
  shutil.copytree(wd, copy)
  with open(copy / "config.json") as f:
    config = json.load(f)
  del config["data"]["text_split"]
  with open(copy / "config.json", "w") as f:
    json.dump(config, f)
  proc = run_main(copy)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert summary(copy)["history"] == ref["history"]
  refused = run_main(copy, "--text_split=line")
  one_line_error(refused, "data.text_split")
