"""Cloud paths (gs://) reach the writers, the cache and orbax unchanged, through etils.epath.

An in-memory fsspec file system stands in for GCS: epath hands gs:// paths to fsspec's
'gcs' protocol, registered here as that memory store. A plain `open` or `os.path.abspath`
on such a path would instead create a local folder 'gs:' in the working directory, which
every test here runs in (an empty tmp_path) and checks is still empty.
"""

from __future__ import annotations

import dataclasses
import importlib
import json

import fsspec
import numpy as np
import pytest
from etils import epath
from fsspec.implementations.memory import MemoryFileSystem

from stabjax import configs, degeneration, paths
from stabjax.checkpoint import Checkpointer
from stabjax.data import DataConfig, load_dataset
from stabjax.data import dataset as dataset_lib
from stabjax.data import text_builder
from stabjax.run import MetricWriter, WorkdirLock, read_jsonl, train_and_evaluate
from stabjax.train import RunConfig

BUCKET = "gs://bucket"


class FakeGCS(MemoryFileSystem):
  """fsspec's memory file system under the gs:// and gcs:// protocols, with its own store."""

  protocol = ("gs", "gcs")
  store: dict = {}
  pseudo_dirs = [""]

  @classmethod
  def _strip_protocol(cls, path):
    path = fsspec.utils.stringify_path(path)
    for prefix in ("gs://", "gcs://"):
      path = path.removeprefix(prefix)
    return super()._strip_protocol(path)


@pytest.fixture
def gcs(tmp_path, monkeypatch):
  """The fake GCS, empty; the test runs in an empty tmp_path."""
  FakeGCS.store.clear()
  FakeGCS.pseudo_dirs[:] = [""]
  FakeGCS.clear_instance_cache()
  for protocol in FakeGCS.protocol:
    fsspec.register_implementation(protocol, FakeGCS, clobber=True)
  monkeypatch.chdir(tmp_path)
  yield FakeGCS()
  FakeGCS.store.clear()
  for protocol in FakeGCS.protocol:  # the real gcsfs again for later tests
    importlib.import_module("fsspec.registry")._registry.pop(protocol, None)
  assert not list(tmp_path.iterdir()), "a cloud path was written as a local one"


def test_paths_keep_cloud_paths_and_make_local_ones_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("RUNS", "runs")
  assert str(paths.absolute(f"{BUCKET}/run")) == f"{BUCKET}/run"
  assert str(paths.absolute("$RUNS/a")) == str(tmp_path / "runs" / "a")
  assert not paths.is_local("s3://b/x") and paths.is_local("gs:/not/a/uri")
  assert DataConfig(cache_dir=f"{BUCKET}/cache").cache_path == f"{BUCKET}/cache"


def test_metric_writer_and_workdir_files_on_a_cloud_workdir(gcs):
  wd = f"{BUCKET}/run"
  with WorkdirLock(wd):  # no flock on an object store: a no-op, nothing written
    writer = MetricWriter(wd, resume_step=0)
    writer.write(1, {"loss": 2.5})
    writer.write(2, {"loss": 2.0})
    writer.write_texts(2, {"samples/0": "a b c"})
    writer.close()
  assert [r["loss"] for r in read_jsonl(f"{wd}/metrics.jsonl")] == [2.5, 2.0]
  assert gcs.cat(f"{wd}/metrics.jsonl").decode().count("\n") == 2
  events = gcs.ls(f"{wd}/tb", detail=False)
  assert len(events) == 1 and "tfevents" in events[0]
  assert gcs.size(events[0]) > 0
  assert not gcs.exists(f"{wd}/.lock")
  # A resumed writer keeps the rows up to its step, in the cloud file.
  MetricWriter(wd, resume_step=1).close()
  assert [r["step"] for r in read_jsonl(f"{wd}/metrics.jsonl")] == [1]


def test_checkpointer_hands_orbax_the_cloud_path(gcs, monkeypatch):
  # orbax lists a gs:// folder through google-cloud-storage (its bucket-layout check),
  # which the fake cannot serve: record what reaches the CheckpointManager instead.
  import stabjax.checkpoint as checkpoint_lib
  handed = []

  class Manager:
    def __init__(self, directory, **kw):
      handed.append(directory)

  monkeypatch.setattr(checkpoint_lib.ocp, "CheckpointManager", Manager)
  ckpt = Checkpointer(f"{BUCKET}/run/checkpoints")
  assert ckpt.directory == f"{BUCKET}/run/checkpoints"
  assert [str(d) for d in handed] == [f"{BUCKET}/run/checkpoints"]


def test_cache_files_and_text_on_a_cloud_path(gcs):
  folder = epath.Path(f"{BUCKET}/cache/x")
  folder.mkdir(parents=True)
  rows = np.arange(12, dtype=np.int32).reshape(3, 4)
  dataset_lib._atomic_write(folder / "rows.npy", lambda f: np.save(f, rows))
  np.testing.assert_array_equal(dataset_lib._load_npy(folder / "rows.npy", mmap=True), rows)
  assert gcs.ls(f"{BUCKET}/cache/x", detail=False) == ["/bucket/cache/x/rows.npy"]
  for name, text in (("a.txt", "one\n\ntwo"), ("b.txt", "three")):
    gcs.pipe(f"{BUCKET}/corpus/{name}", text.encode())
  files = text_builder.resolve_files(f"{BUCKET}/corpus/*.txt")
  assert files == [f"{BUCKET}/corpus/a.txt", f"{BUCKET}/corpus/b.txt"]
  assert text_builder.read_documents(files) == ["one", "two", "three"]


def test_a_run_in_a_cloud_workdir_writes_every_file_there(gcs, tmp_path, monkeypatch):
  """train_and_evaluate on gs://: config, metrics, TensorBoard, samples and summary land
  in the cloud folder. Only orbax's arrays go to a local folder (tensorstore has its own
  GCS driver, which the fake cannot serve): the Checkpointer must be handed the gs:// path."""
  import stabjax.run as run_lib
  local_ckpt = tmp_path.parent / f"{tmp_path.name}-ckpt"
  handed = []

  def checkpointer(directory, keep):
    handed.append(str(directory))
    return Checkpointer(local_ckpt, keep=keep)

  monkeypatch.setattr(run_lib, "Checkpointer", checkpointer)
  data = load_dataset(DataConfig(spec="synthetic", seq_len=16, synthetic_n=32,
                                 synthetic_n_validation=8, synthetic_vocab_size=32), seed=0)
  model = configs.get_model_config("gpt2_tiny", vocab_size=data.vocab_size, num_layers=1,
                                   d_model=16, d_ff=32, num_heads=2)
  cfg = RunConfig(model=model, data=data.config,
                  train=configs.TrainConfig(steps=2, batch_size=4, seq_len=16, eval_every=2,
                                            eval_batches=1, checkpoint_every=2, log_every=1),
                  generation=degeneration.GenerationEvalConfig(
                      num_samples=2, decoders=("sample",), eval_gen_prompts=0))
  wd = f"{BUCKET}/run"
  summary = train_and_evaluate(cfg, wd, data, show_progress=False)
  assert handed == [f"{wd}/checkpoints"]
  assert summary["workdir"] == wd and summary["status"] == "finished"
  assert json.loads(gcs.cat(f"{wd}/config.json"))["train"]["steps"] == 2
  assert json.loads(gcs.cat(f"{wd}/summary.json"))["step"] == 2
  assert [r["step"] for r in read_jsonl(f"{wd}/metrics.jsonl") if "loss" in r] == [1, 2]
  assert gcs.cat(f"{wd}/samples.txt")
  assert len(gcs.ls(f"{wd}/tb", detail=False)) == 1
  # The same run resumes from its config.json in the cloud and refuses changed settings.
  other = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=cfg.train.lr * 2))
  with pytest.raises(run_lib.WorkdirError, match="other training settings"):
    train_and_evaluate(other, wd, data, show_progress=False)
  import shutil
  shutil.rmtree(local_ckpt, ignore_errors=True)
