"""The run flags are generated from the config dataclasses (experiments/common.py)."""

from __future__ import annotations

import dataclasses
import glob
import os
import subprocess
import sys
import typing

import pytest
from absl import flags

from experiments import common
from stabjax import configs
from stabjax.train import RunConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every flag the hand-written define_run_flags had: the README, REPRODUCTION.md, the
# paper's command and earlier runs use these names.
EARLIER_FLAGS = (
    "model alpha feedback feedback_target feedback_ema_decay seed data vocab_size cache_dir "
    "steps batch_size seq_len lr warmup_steps min_lr_ratio weight_decay clip_norm optimizer "
    "dmu c_tilde dmu_mode dmu_rescale dtu dtu_keep dtu_scores psu psu_value "
    "psu_grad_max_decay psu_c_tilde_from mesh dtype remat scan_layers eval_every "
    "eval_batches checkpoint_every keep_checkpoints log_every distributed progress "
    "num_samples prompt_len max_new_tokens decoders temperature top_k top_p hf_top_k "
    "eval_gen_prompts eval_gen_tokens").split()


def parse(*argv):
  fv = flags.FlagValues()
  common.define_run_flags(fv)
  fv(["prog", *argv])
  return fv


def leaves(cls, obj, path=""):
  """{dotted path: value} of every non-dataclass field, recursively (introspected)."""
  out = {}
  hints = typing.get_type_hints(cls)
  for f in dataclasses.fields(cls):
    p = f"{path}.{f.name}" if path else f.name
    if dataclasses.is_dataclass(hints[f.name]):
      out.update(leaves(hints[f.name], getattr(obj, f.name), p))
    else:
      out[p] = getattr(obj, f.name)
  return out


def test_every_config_field_is_a_flag_or_set_from_one():
  fv = parse()
  cfg = common.build_config(fv)
  settings = {s.path: s for s in common.run_settings()}
  for path, value in leaves(RunConfig, cfg).items():
    if path in common.NOT_FLAGS:  # the shape from --model, the vocabulary, seq_len, seed
      continue
    s = settings[path]
    assert s.flag in fv, path
    assert s.help and s.help != path, f"{path} has no help in its class's Attributes"
    assert fv[s.flag].value == (list(value) if isinstance(value, tuple) else value), path
  assert set(common.NOT_FLAGS) <= set(leaves(RunConfig, cfg))  # no stale exclusions
  assert set(EARLIER_FLAGS) <= set(fv)


def test_flags_round_trip_into_their_fields():
  cfg = common.build_config(parse(
      "--psu_penalty=0.02", "--psu_baseline=features", "--psu=false", "--text_feature=body",
      "--max_documents=7", "--tfds_data_dir=/data/tfds", "--text_split=line",
      "--c_tilde=0.25", "--dtu_block_q=64", "--dmu=false", "--seq_len=48", "--seed=5",
      "--decoders=greedy,top_k", "--gen_batch_size=8", "--model=bert_tiny", "--dtype=bfloat16",
      "--feedback=data", "--feedback_target=1.5", "--synthetic_seed=none", "--b2=0.99"))
  assert (cfg.psu.penalty, cfg.psu.baseline, cfg.psu.enabled) == (0.02, "features", False)
  assert (cfg.data.text_feature, cfg.data.max_documents, cfg.data.tfds_data_dir,
          cfg.data.text_split, cfg.data.synthetic_seed) == ("body", 7, "/data/tfds", "line", None)
  assert (cfg.model.dmu.c_tilde, cfg.model.dmu.enabled, cfg.model.dtu.block_q) == (0.25, False, 64)
  assert (cfg.model.name, cfg.model.num_layers, cfg.model.dtype) == ("bert_tiny", 2, "bfloat16")
  assert cfg.data.seq_len == cfg.train.seq_len == 48
  assert cfg.generation.seed == cfg.train.seed == 5
  assert (cfg.generation.decoders, cfg.generation.batch_size) == (("greedy", "top_k"), 8)
  assert (cfg.train.feedback_target, cfg.train.b2) == (1.5, 0.99)
  assert common.build_config(parse()).train.feedback_target is None


@pytest.mark.parametrize("flag,accepted", [
    ("--text_split=paragraph", "accepted: auto, blank_line, line"),
    ("--dmu_mode=dense", "accepted: dmu2_prob, dmu2_fix, dprob, dfix"),
    ("--psu_baseline=none", "accepted: moving_average, features"),
    ("--dtype=float16", "accepted: float32, bfloat16"),
    ("--model=gpt5", "accepted: gpt2_nano"),
])
def test_a_bad_choice_is_one_line_naming_the_accepted_values(capsys, flag, accepted):
  with pytest.raises(SystemExit) as e:
    common.build_config(parse(flag))
  err = capsys.readouterr().err.strip()
  assert e.value.code != 0 and "\n" not in err
  assert err.startswith(f"error: {flag.split('=')[0]}=") and accepted in err, err


@pytest.mark.parametrize("flag,named", [
    ("--psu_gamma_min=2", "--psu_gamma_min"), ("--dtu_keep=0", "--dtu_keep must be >= 1"),
    ("--c_tilde=1.5", "--c_tilde must be in (0, 1]"), ("--max_documents=0", "--max_documents=0"),
    ("--gen_batch_size=0", "--gen_batch_size must be >= 1"),
    ("--seq_len=1", "--seq_len must be >= 2")])
def test_a_bad_value_names_its_flag(capsys, flag, named):
  with pytest.raises(SystemExit):
    common.build_config(parse(flag))
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and named in err, err


@dataclasses.dataclass(frozen=True)
class Tracker:
  """Attributes:
    enabled: log at all.
    project, entity: where to log,
      continued here.
  """
  enabled: bool = False
  project: str | None = None
  entity: str = "me"


@dataclasses.dataclass(frozen=True)
class ToyRun:
  """A run config another helper grew (module level: its hints must resolve).

  Attributes:
    warm_start: a checkpoint to start from.
    tracker: tracking.
  """
  warm_start: str | None = None
  every: tuple[int, ...] = (1, 2)
  tracker: Tracker = Tracker()


def test_a_new_field_or_section_becomes_a_flag_without_code():
  got = {s.flag: (s.path, s.kind, s.optional, s.is_list, s.help)
         for s in common.run_settings(ToyRun)}
  assert got == {
      "warm_start": ("warm_start", str, True, False, "a checkpoint to start from."),
      "every": ("every", int, False, True, ""),
      "tracker": ("tracker.enabled", bool, False, False, "log at all."),
      "tracker_project": ("tracker.project", str, True, False, "where to log, continued here."),
      "tracker_entity": ("tracker.entity", str, False, False, "where to log, continued here."),
  }


@dataclasses.dataclass(frozen=True)
class Clash:
  seed: int = 0
  train: configs.TrainConfig = configs.TrainConfig()  # a flat section: --seed again


def test_two_fields_with_one_flag_name_are_refused():
  with pytest.raises(ValueError, match="--seed would be both seed and train.seed"):
    common.run_settings(Clash)


def test_helpshort_lists_the_run_flags_on_every_launcher():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  for name, own in [("main", "workdir"), ("table1", "models"), ("ablation", "variants"),
                    ("trajectory", "loss_key"), ("mechanism", "forms"), ("scale", "alphas")]:
    proc = subprocess.run([sys.executable, os.path.join(REPO, "experiments", f"{name}.py"),
                           "--helpshort"], capture_output=True, text=True, timeout=120, env=env)
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]  # (absl exits 1 after help)
    for flag in ("alpha", "model", "psu_penalty", "text_split", "tfds_data_dir", "wandb_project",
                 "[no]distributed", "[no]psu", own):
      assert f"  --{flag}:" in proc.stdout, (name, flag)
    assert "Accepted: auto, blank_line, line." in " ".join(proc.stdout.split())


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "experiments", "configs",
                                                               "*.flags"))))
def test_flagfile_recipes_parse_into_valid_run_configs(path):
  model = os.path.basename(path).split("_table1")[0]
  cfg = common.build_config(parse(f"--flagfile={path}", "--alpha=0.05", "--seed=2026"))
  assert (cfg.model.name, cfg.train.alpha, cfg.train.seed) == (model, 0.05, 2026)
  assert cfg.model.dtype == "bfloat16" and cfg.model.remat and cfg.model.scan_layers
  assert cfg.data.spec.startswith("tfds:") and cfg.train.seq_len <= cfg.model.max_len
  assert len(glob.glob(os.path.join(REPO, "experiments", "configs", "*.flags"))) == 4
