"""Flags shared by the launchers, and the flags -> RunConfig translation with its checks.

Flags live only here and in the launchers; the library takes dataclasses.
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags, logging

from stabjax import configs, sharding
from stabjax.degeneration import GenerationEvalConfig
from stabjax.configs import DMU_MODES, DTU_SCORES, FEEDBACK_FORMS, MODEL_CONFIGS, OPTIMIZERS
from stabjax.psu import C_TILDE_FROM, PSUConfig

FLAGS = flags.FLAGS
DTYPES = ("float32", "bfloat16")
PSU_VALUES = ("exact", "linear")


def define_run_flags() -> None:
  """Every knob of the SPEC as an absl flag (string flags for choices: validated in one place)."""
  d = configs.TrainConfig()
  dmu, dtu = configs.DMUConfig(), configs.DTUConfig()
  flags.DEFINE_string("model", "gpt2_tiny", f"Model size: {', '.join(MODEL_CONFIGS)}.")
  flags.DEFINE_float("alpha", d.alpha, "Feedback strength alpha >= 0 (eq. 61); 0 is plain MLE.")
  flags.DEFINE_string("feedback", d.feedback, "How alpha enters training: zero = "
                      "(alpha/2)(H - 0)^2; ema = (alpha/2)(H - sg(EMA(H)))^2; data = "
                      "(alpha/2)(H - H_data)^2; psu_only = no loss term (alpha only in the "
                      f"PSU's confidence). Accepted: {', '.join(FEEDBACK_FORMS)}.")
  flags.DEFINE_float("feedback_target", d.feedback_target, "H_data of --feedback=data, nats "
                     "per predicted token (default: the language's exact conditional entropy "
                     "on synthetic data; required on text, e.g. the alpha=0 run's val_entropy).")
  flags.DEFINE_float("feedback_ema_decay", d.feedback_ema_decay,
                     "EMA decay of --feedback=ema, in [0, 1).")
  flags.DEFINE_integer("seed", d.seed, "Seed of parameters, masks, PSU and data order.")
  flags.DEFINE_string("data", "synthetic", "synthetic | text:PATH_OR_GLOB | tfds:NAME[/CONFIG].")
  flags.DEFINE_integer("vocab_size", 2048, "SentencePiece vocabulary size (text/tfds data).")
  flags.DEFINE_string("cache_dir", None, "Dataset/tokenizer cache (default ~/.cache/stabjax).")
  flags.DEFINE_integer("steps", d.steps, "Training steps.")
  flags.DEFINE_integer("batch_size", d.batch_size, "Global batch size (sequences).")
  flags.DEFINE_integer("seq_len", d.seq_len, "Sequence length (tokens).")
  flags.DEFINE_float("lr", d.lr, "Peak learning rate (AdamW, warmup then cosine decay).")
  flags.DEFINE_integer("warmup_steps", d.warmup_steps, "Linear warmup steps.")
  flags.DEFINE_float("min_lr_ratio", d.min_lr_ratio, "Final learning rate as a fraction of --lr.")
  flags.DEFINE_float("weight_decay", d.weight_decay, "AdamW weight decay.")
  flags.DEFINE_float("clip_norm", d.clip_norm, "Global gradient-norm clip.")
  flags.DEFINE_string("optimizer", d.optimizer, f"Base optimizer: {', '.join(OPTIMIZERS)} "
                      "(sgd: plain SGD with L2 weight decay, the setting of Lemma 4.1).")
  flags.DEFINE_bool("dmu", True, "Use the Dynamic MLP Unit in every block.")
  flags.DEFINE_float("c_tilde", dmu.c_tilde, "DMU retention c~ in (0, 1].")
  flags.DEFINE_string("dmu_mode", dmu.mode, f"DMU mode: {', '.join(DMU_MODES)}.")
  flags.DEFINE_bool("dmu_rescale", dmu.rescale, "Inverted DMU scaling (1/c~ in training).")
  flags.DEFINE_bool("dtu", True, "Use the Dynamic Transformer Unit in every block.")
  flags.DEFINE_integer("dtu_keep", dtu.keep, "DTU keys sampled per query (a3) >= 1.")
  flags.DEFINE_string("dtu_scores", dtu.scores, f"DTU compatibility scores: {', '.join(DTU_SCORES)}.")
  flags.DEFINE_bool("psu", True, "Use the PSU decision layer after AdamW.")
  flags.DEFINE_string("psu_value", "exact", f"PSU batch value: {', '.join(PSU_VALUES)}.")
  p = PSUConfig()
  flags.DEFINE_float("psu_grad_max_decay", p.grad_max_decay,
                     "Per-step decay of the running max of the grad norm that normalises the "
                     "PSU's learning accuracy a~ (eq. 62); 1 = a plain running max.")
  flags.DEFINE_string("psu_c_tilde_from", p.c_tilde_from,
                      "Whose learning complexity c~ (eq. 63) sets the PSU's eta_mod: run (this "
                      "model's units) or full (the same model with DMU and DTU on).")
  flags.DEFINE_string("mesh", d.mesh, "Device mesh, e.g. data=1,fsdp=-1,tensor=1.")
  flags.DEFINE_string("dtype", "float32", f"Compute dtype: {', '.join(DTYPES)} (params stay float32).")
  flags.DEFINE_bool("remat", False, "Rematerialise blocks in the backward pass (large models).")
  flags.DEFINE_bool("scan_layers", False, "Stack blocks with nn.scan (large models).")
  flags.DEFINE_integer("eval_every", d.eval_every, "Evaluate every N steps.")
  flags.DEFINE_integer("eval_batches", d.eval_batches, "Validation batches per evaluation.")
  flags.DEFINE_integer("checkpoint_every", d.checkpoint_every, "Checkpoint every N steps.")
  flags.DEFINE_integer("keep_checkpoints", d.keep_checkpoints, "Checkpoints kept.")
  flags.DEFINE_integer("log_every", d.log_every, "Log metrics every N steps.")
  flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host TPU pods).")
  flags.DEFINE_bool("progress", True, "Show a tqdm progress bar.")
  g = GenerationEvalConfig()
  flags.DEFINE_integer("num_samples", g.num_samples, "Generations measured at the end of a run.")
  flags.DEFINE_integer("prompt_len", g.prompt_len, "Validation tokens used as each prompt.")
  flags.DEFINE_integer("max_new_tokens", g.max_new_tokens, "Tokens per generation (0: seq_len - prompt_len).")
  flags.DEFINE_list("decoders", list(g.decoders), "Decoders every run is measured under, from "
                    "the same prompts: sample, greedy, top_k, nucleus.")
  flags.DEFINE_float("temperature", g.temperature, "Temperature of sample, top_k and nucleus (> 0).")
  flags.DEFINE_integer("top_k", g.top_k, "k of the top_k decoder (>= 1).")
  flags.DEFINE_float("top_p", g.top_p, "p of the nucleus decoder, in (0, 1].")
  flags.DEFINE_integer("hf_top_k", g.hf_top_k, "K of the high-frequency word proportion.")
  flags.DEFINE_integer("eval_gen_prompts", g.eval_gen_prompts, "Prompts of the small generation "
                       "batch measured at every evaluation (sampling; 0: none).")
  flags.DEFINE_integer("eval_gen_tokens", g.eval_gen_tokens,
                       "Tokens per generation of that batch.")


def fail(message: str, code: int = 2):
  """One line on stderr, a non-zero exit, no traceback."""
  import logging as std_logging
  # After a failed checkpoint write, orbax's writer threads still hold failed futures;
  # asyncio would report each one at exit, burying the one line.
  std_logging.getLogger("asyncio").disabled = True
  print(f"error: {message}", file=sys.stderr)
  sys.exit(code)


def _choice(name: str, value: str, accepted) -> str:
  if value not in accepted:
    fail(f"--{name}={value!r} is not accepted; accepted: {', '.join(accepted)}")
  return value


def build_config(F, **overrides):
  """Flags -> RunConfig; any invalid value ends the program with one line."""
  from stabjax.data import DataConfig
  from stabjax.train import RunConfig

  _choice("model", F.model, MODEL_CONFIGS)
  _choice("dmu_mode", F.dmu_mode, DMU_MODES)
  _choice("dtu_scores", F.dtu_scores, DTU_SCORES)
  _choice("feedback", F.feedback, FEEDBACK_FORMS)
  _choice("psu_value", F.psu_value, PSU_VALUES)
  _choice("optimizer", F.optimizer, OPTIMIZERS)
  _choice("psu_c_tilde_from", F.psu_c_tilde_from, C_TILDE_FROM)
  _choice("dtype", F.dtype, DTYPES)
  if not 0.0 < F.c_tilde <= 1.0:
    fail(f"--c_tilde={F.c_tilde} is not accepted; accepted: a number in (0, 1]")
  if F.dtu_keep < 1:
    fail(f"--dtu_keep={F.dtu_keep} is not accepted; accepted: an integer >= 1")
  try:
    model = configs.get_model_config(
        F.model, dtype=F.dtype, remat=F.remat, scan_layers=F.scan_layers,
        dmu=configs.DMUConfig(enabled=F.dmu, c_tilde=F.c_tilde, mode=F.dmu_mode,
                              rescale=F.dmu_rescale),
        dtu=configs.DTUConfig(enabled=F.dtu, keep=F.dtu_keep, scores=F.dtu_scores))
    # --init_from (experiments/main.py): the checkpoint's positions bound it there instead.
    if F.seq_len > model.max_len and not getattr(F, "init_from", None):
      fail(f"--seq_len={F.seq_len} exceeds {F.model}'s {model.max_len} positions; accepted: "
           f"2..{model.max_len}")
    train = configs.TrainConfig(
        steps=F.steps, batch_size=F.batch_size, seq_len=F.seq_len, lr=F.lr,
        warmup_steps=F.warmup_steps, min_lr_ratio=F.min_lr_ratio, weight_decay=F.weight_decay,
        clip_norm=F.clip_norm, optimizer=F.optimizer, alpha=F.alpha, feedback=F.feedback,
        feedback_target=F.feedback_target, feedback_ema_decay=F.feedback_ema_decay,
        seed=F.seed, mesh=F.mesh, eval_every=F.eval_every,
        eval_batches=F.eval_batches, checkpoint_every=F.checkpoint_every,
        keep_checkpoints=F.keep_checkpoints, log_every=F.log_every)
    data_kw = dict(spec=F.data, seq_len=F.seq_len, vocab_size=F.vocab_size)
    if F.cache_dir:
      data_kw["cache_dir"] = F.cache_dir
    data = DataConfig(**data_kw)
    generation = GenerationEvalConfig(
        num_samples=F.num_samples, prompt_len=F.prompt_len, max_new_tokens=F.max_new_tokens,
        decoders=tuple(F.decoders), temperature=F.temperature, top_k=F.top_k, top_p=F.top_p,
        hf_top_k=F.hf_top_k, eval_gen_prompts=F.eval_gen_prompts,
        eval_gen_tokens=F.eval_gen_tokens, seed=F.seed)
    psu = PSUConfig(enabled=F.psu, value=F.psu_value, grad_max_decay=F.psu_grad_max_decay,
                    c_tilde_from=F.psu_c_tilde_from)
    cfg = RunConfig(model=model, train=train, psu=psu,
                    data=data, generation=generation)
  except ValueError as e:
    fail(str(e))
  return cfg


def check_mesh(cfg) -> None:
  import jax
  try:
    shape = sharding.resolve_mesh_shape(sharding.parse_mesh(cfg.train.mesh), jax.device_count())
  except ValueError as e:
    fail(str(e))
  dp = shape["data"] * shape["fsdp"]
  if cfg.train.batch_size % dp:
    fail(f"--batch_size={cfg.train.batch_size} is not divisible by the {dp} data-parallel "
         f"devices of --mesh={cfg.train.mesh}; accepted: a multiple of {dp}")


def prepare_run(F):
  """Validate everything and load the data before anything is written to the workdir."""
  from stabjax.data import DataError, load_dataset

  if not F["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax and TFDS log every save at INFO
  cfg = build_config(F)
  if F.distributed:
    import jax
    jax.distributed.initialize()
  check_mesh(cfg)
  try:
    dataset = load_dataset(cfg.data, seed=cfg.train.seed)
  except DataError as e:
    fail(str(e))
  import dataclasses
  from stabjax.run import resolve_feedback_target
  model = cfg.model.replace(vocab_size=dataset.tokenizer.vocab_size)
  try:
    cfg = resolve_feedback_target(dataclasses.replace(cfg, model=model), dataset)
  except ValueError as e:
    fail(str(e))
  return cfg, dataset


def run_and_report(cfg, dataset, workdir: str, init_params=None) -> dict:
  from stabjax.checkpoint import CheckpointError
  from stabjax.run import NonFiniteLossError, WorkdirError, train_and_evaluate
  try:
    summary = train_and_evaluate(cfg, workdir, dataset, show_progress=FLAGS.progress,
                                 init_params=init_params)
  except (NonFiniteLossError, WorkdirError, CheckpointError) as e:
    fail(str(e), code=1)
  workdir = os.path.abspath(workdir)
  if summary["status"] == "preempted":
    print(f"preempted at step {summary['step']}: checkpoint saved in {workdir}/checkpoints; "
          f"run the same command again to resume")
    return summary
  print(metrics_table(summary))
  print(f"workdir: {workdir}\n  config.json, metrics.jsonl, summary.json, samples.txt, tb/, "
        f"checkpoints/")
  return summary


SUMMARY_KEYS = ("hf_proportion", "hf_proportion_reference", "generative_entropy",
                "effective_rank", "distinct_2", "distinct_2_reference", "seq_rep_4",
                "unigram_kl", "zipf", "no_eos_share", "length_mean")


def metrics_table(summary: dict) -> str:
  """The run's headline numbers as a two-column markdown table."""
  final, gen = summary["final"], summary.get("generation", {})
  rows = [("train loss", final.get("loss")), ("train entropy H(B_t)", final.get("entropy")),
          ("val loss", final.get("val_loss")), ("val perplexity", final.get("val_ppl")),
          ("PSU update multiplier (mean)", summary.get("psu", {}).get("multiplier_mean"))]
  for decoder, metrics in gen.items():
    keys = {"sample": SUMMARY_KEYS, "synthetic": metrics}.get(
        decoder, ("hf_proportion", "generative_entropy"))
    rows += [(f"{decoder}/{k}", metrics.get(k)) for k in keys
             if isinstance(metrics.get(k), (int, float))]
  lines = ["| metric | value |", "|---|---|"]
  lines += [f"| {k} | {v:.4g} |" for k, v in rows if v is not None]
  return "\n".join(lines)


# ---- sweep launchers
# What experiments/table1.py, ablation.py, trajectory.py and scale.py share, so that no
# launcher imports another (each defines its own flags, with its own defaults).


def define_sweep_flags(models, seeds, alphas, workdir: str) -> None:
  """--models, --seeds, --alphas (lists) and --workdir with a launcher's defaults."""
  flags.DEFINE_list("models", list(models), f"Model sizes: {', '.join(MODEL_CONFIGS)}.")
  flags.DEFINE_list("seeds", [str(s) for s in seeds], "Seeds (integers).")
  flags.DEFINE_list("alphas", [str(a) for a in alphas], "Feedback strengths alpha >= 0.")
  flags.DEFINE_string("workdir", workdir, "Sweep directory: one subdirectory per run.")


def parse_grid(F) -> tuple[list[str], list[int], list[float]]:
  """--models/--seeds/--alphas -> lists; a bad value ends the program with one line."""
  from stabjax import sweep as sweep_lib
  try:
    return sweep_lib.parse_grid(F.models, F.seeds, F.alphas)
  except ValueError as e:
    fail(str(e))


def base_config(F):
  """The flags' RunConfig (validated once) that every condition of a sweep overrides."""
  if not F["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  cfg = build_config(F)
  if F.distributed:
    import jax
    jax.distributed.initialize()
  check_mesh(cfg)
  return cfg


def sweep(runs, workdir: str, reuse_from=()) -> list[dict]:
  """stabjax.sweep.run_sweep with the launcher's error handling; exits if a run stopped."""
  from stabjax import sweep as sweep_lib
  from stabjax.data import DataError
  from stabjax.checkpoint import CheckpointError
  from stabjax.run import NonFiniteLossError, WorkdirError
  try:
    summaries = sweep_lib.run_sweep(runs, workdir, show_progress=FLAGS.progress,
                                    reuse_from=reuse_from)
  except (DataError, NonFiniteLossError, ValueError, WorkdirError, CheckpointError) as e:
    fail(str(e), code=1)
  if len(summaries) < len(runs) or summaries[-1]["status"] != "finished":
    print("sweep interrupted: run the same command again to continue")
    sys.exit(1)
  return summaries


def alpha_label(a: float) -> str:
  return f"α={a:g}"


def run_grid(base, models, seeds, alphas, workdir: str) -> tuple[list, list[dict], float]:
  """The models x seeds x alphas sweep of `base` in `workdir` (Table 1's grid): (runs,
  summaries, elapsed seconds)."""
  import time
  from stabjax import sweep as sweep_lib
  runs = [sweep_lib.SweepRun(sweep_lib.run_name(m, s, a),
                             sweep_lib.override_config(base, model=m, seed=s, alpha=a),
                             {"model": m, "seed": s, "alpha": a})
          for m in models for s in seeds for a in alphas]
  os.makedirs(workdir, exist_ok=True)
  start = time.perf_counter()
  summaries = sweep(runs, workdir)
  return runs, summaries, time.perf_counter() - start
