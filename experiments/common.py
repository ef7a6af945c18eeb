"""Flags shared by the launchers, and the flags -> RunConfig translation with its checks.

Flags live only here and in the launchers; the library takes dataclasses.

The run flags are generated from the run's config dataclasses (`stabjax.train.RunConfig`
and its sections, recursively): one flag per field, with the field's type, default and
help (the `Attributes:` section of the class's docstring, stabjax/configs.py), so a new
field is a new flag with no code here. Field types: bool, int, float, str, a `Literal` of
strings (a choice: the accepted values are checked and named), `X | None` ('none' or an
empty value gives None) and `tuple[X, ...]` (a comma-separated list). Flag names:

* RunConfig's own fields and those of the sections in FLAT_SECTIONS keep their name
  (--steps, --alpha, --dtype, --remat, --text_feature, --tfds_data_dir, --num_samples);
* every other section prefixes its fields with its name (--psu_value, --dmu_mode,
  --dtu_keep, --psu_penalty), and its `enabled` field is the bare name (--psu, --dmu, --dtu);
* RENAMED keeps the names the README, the paper's command and earlier runs use;
* NOT_FLAGS get their value elsewhere: the model's shape (FROM_MODEL) comes from --model
  (a named size; add one to configs.MODEL_CONFIGS for another shape, so that a run's name
  says its shape), its vocabulary from the tokenizer, and FROM_FLAG fields from another
  section's flag (data.seq_len from --seq_len, generation.seed from --seed); LAUNCHER_ONLY
  fields are one launcher's own flag (--init_from of experiments/main.py).

Hand-written here are only the flags that are not run config: --model (which named size),
--progress, --compilation_cache_dir, --distributed (and its coordinator flags),
--wandb_project and --wandb_entity.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import sys
import types
import typing
from typing import Any, Literal

from absl import flags, logging

from stabjax import compile_cache, configs, sharding
from stabjax.configs import MODEL_CONFIGS

FLAGS = flags.FLAGS

# Sections whose fields are flags under their own name; the others prefix it with theirs.
FLAT_SECTIONS = ("train", "model", "data", "generation")
RENAMED = {
    "model.dmu.c_tilde": "c_tilde",  # the paper's c~, --c_tilde since the first release
    "data.spec": "data",  # --data=synthetic | text:PATH | tfds:NAME
    "generation.batch_size": "gen_batch_size",  # --batch_size is the training batch
}
# Fields with no flag of their own. The named size's (--model) shape; its vocabulary is
# replaced by the tokenizer's:
FROM_MODEL = ("name", "arch", "vocab_size", "max_len", "num_layers", "num_heads", "d_model",
              "d_ff", "layer_norm_eps", "type_vocab_size")
# and fields set from another section's flag:
FROM_FLAG = {"data.seq_len": "seq_len", "generation.seed": "seed"}
# and fields one launcher sets with its own flag, because setting them means more than a
# value (experiments/main.py --init_from also loads the checkpoint's weights and tokenizer;
# a sweep launcher offering it would silently train from scratch):
LAUNCHER_ONLY = ("init_from",)
NOT_FLAGS = frozenset({f"model.{f}" for f in FROM_MODEL} | set(FROM_FLAG) | set(LAUNCHER_ONLY))


@dataclasses.dataclass(frozen=True)
class Setting:
  """One flag of the run config: the field at `path` (dotted, e.g. 'model.dmu.c_tilde')."""

  path: str
  flag: str
  kind: type  # bool, int, float or str (of the elements, for a list)
  default: Any
  help: str
  choices: tuple[str, ...] = ()
  optional: bool = False  # X | None
  is_list: bool = False  # tuple[X, ...]


def field_docs(cls) -> dict[str, str]:
  """{field: text} from the `Attributes:` section of `cls`'s docstring (`name: text`,
  continued on more-indented lines; `a, b: text` documents both)."""
  out: dict[str, str] = {}
  names: list[str] = []
  indent = None
  in_section = False
  for line in (inspect.getdoc(cls) or "").splitlines():
    if line.strip() == "Attributes:":
      in_section = True
      continue
    if not in_section or not line.strip():
      continue
    depth = len(line) - len(line.lstrip())
    indent = depth if indent is None else indent
    if depth < indent:
      break
    m = re.fullmatch(r"\s*([\w, ]+):\s*(.*)", line) if depth == indent else None
    if depth == indent and m is None:
      break
    if m is not None:
      names = [n.strip() for n in m.group(1).split(",")]
      out.update({n: m.group(2) for n in names})
    else:
      out.update({n: f"{out[n]} {line.strip()}" for n in names})
  return out


def flag_name(path: str) -> str:
  if path in RENAMED:
    return RENAMED[path]
  section, _, name = path.rpartition(".")
  if not section or section in FLAT_SECTIONS:
    return name
  prefix = section.rpartition(".")[2]
  return prefix if name == "enabled" else f"{prefix}_{name}"


def _field_type(t, where: str) -> tuple[type, tuple, bool, bool]:
  """(kind, choices, optional, is_list) of a field's type hint."""
  origin, args = typing.get_origin(t), typing.get_args(t)
  optional = origin in (typing.Union, types.UnionType) and type(None) in args
  if optional:
    rest = [a for a in args if a is not type(None)]
    t = rest[0] if len(rest) == 1 else t
    origin, args = typing.get_origin(t), typing.get_args(t)
  is_list = origin is tuple and len(args) == 2 and args[1] is Ellipsis
  if is_list:
    t = args[0]
    origin, args = typing.get_origin(t), typing.get_args(t)
  choices = ()
  if origin is Literal:
    choices, t = args, type(args[0])
  if t not in (bool, int, float, str) or (optional and is_list) or (
      choices and not all(isinstance(c, str) for c in choices)):
    raise TypeError(f"{where}: type {t!r} has no flag; use bool, int, float, str, a Literal "
                    f"of strings, X | None or tuple[X, ...], or add it to FROM_MODEL/FROM_FLAG")
  return t, tuple(choices), optional, is_list


def _walk(cls, path: str = ""):
  """(dotted path, field, type hint, section class or None) of every field, recursively."""
  hints = typing.get_type_hints(cls)
  for f in dataclasses.fields(cls):
    p = f"{path}.{f.name}" if path else f.name
    t = hints[f.name]
    yield p, f, t, (t if dataclasses.is_dataclass(t) else None)


def run_settings(cls=None, path: str = "") -> list[Setting]:
  """Every flag of the run config, generated from the dataclasses (see the module doc)."""
  if cls is None:
    from stabjax.train import RunConfig
    cls = RunConfig
  docs, out = field_docs(cls), []
  for p, f, t, section in _walk(cls, path):
    if section is not None:
      out += run_settings(section, p)
      continue
    if p in NOT_FLAGS:
      continue
    if f.default is not dataclasses.MISSING:
      default = f.default
    elif f.default_factory is not dataclasses.MISSING:
      default = f.default_factory()
    else:
      raise TypeError(f"{cls.__name__}.{f.name} has no default, so it cannot be a flag; give "
                      f"it one or add it to FROM_MODEL/FROM_FLAG")
    kind, choices, optional, is_list = _field_type(t, f"{cls.__name__}.{f.name}")
    out.append(Setting(p, flag_name(p), kind, default, docs.get(f.name, ""), choices,
                       optional, is_list))
  if not path:
    seen: dict[str, str] = {}
    for s in out:
      if s.flag in seen:
        raise ValueError(f"--{s.flag} would be both {seen[s.flag]} and {s.path}; give one "
                         f"a name in RENAMED")
      seen[s.flag] = s.path
  return out


class _OptionalParser(flags.ArgumentParser):
  """X | None: 'none' or an empty value is None (a string only when empty), else X."""

  def __init__(self, inner: flags.ArgumentParser, kind: type):
    self._inner, self._kind = inner, kind

  def parse(self, argument):
    if argument is None:
      return None
    if isinstance(argument, str) and (argument.strip() == "" or (
        self._kind is not str and argument.strip().lower() == "none")):
      return None
    return self._inner.parse(argument)

  def flag_type(self) -> str:
    return f"{self._inner.flag_type()} or none"


def _define(s: Setting, fv) -> None:
  text = s.help or s.path
  if s.choices:
    text += f" Accepted: {', '.join(s.choices)}."
  if s.optional:
    text += " Empty" + ("" if s.kind is str else " or 'none'") + ": None."
  kw = dict(flag_values=fv)
  if s.is_list:
    flags.DEFINE_list(s.flag, [str(v) for v in s.default], text, **kw)
  elif s.optional:
    parser = {int: flags.IntegerParser, float: flags.FloatParser, bool: flags.BooleanParser,
              str: flags.ArgumentParser}[s.kind]()
    flags.DEFINE(_OptionalParser(parser, s.kind), s.flag, s.default, text, **kw)
  else:
    define = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float,
              str: flags.DEFINE_string}[s.kind]
    define(s.flag, s.default, text, **kw)


def define_run_flags(flag_values=FLAGS) -> None:
  """One flag per setting of the run config, plus the launcher flags that are not config."""
  flags.DEFINE_string("model", "gpt2_tiny", f"Model size (its shape): "
                      f"{', '.join(MODEL_CONFIGS)}.", flag_values=flag_values)
  for s in run_settings():
    _define(s, flag_values)
  define_distributed_flags(flag_values)
  flags.DEFINE_bool("progress", True, "Show a tqdm progress bar.", flag_values=flag_values)
  flags.DEFINE_string("compilation_cache_dir",
                      os.environ.get("STABJAX_COMPILATION_CACHE_DIR", compile_cache.DEFAULT_DIR),
                      "JAX's persistent compilation cache: runs with the same compiled steps "
                      "load them from here instead of compiling again (default: "
                      "$STABJAX_COMPILATION_CACHE_DIR, else "
                      f"{compile_cache.DEFAULT_DIR}); empty: off.", flag_values=flag_values)
  flags.DEFINE_string("wandb_project", None, "Also log metrics and samples to this Weights & "
                      "Biases project (process 0 only; needs pip install -e '.[wandb]'). "
                      "Unset: wandb is never imported.", flag_values=flag_values)
  flags.DEFINE_string("wandb_entity", None, "W&B entity (user or team) of --wandb_project.",
                      flag_values=flag_values)


def define_distributed_flags(flag_values=FLAGS) -> None:
  """--distributed and the coordinator flags of several processes (`init_distributed`)."""
  flags.DEFINE_bool("distributed", False, "Run as one of several processes: call "
                    "jax.distributed.initialize(), which finds the coordinator itself on TPU "
                    "VMs and SLURM/Open MPI clusters; elsewhere also give --coordinator_address, "
                    "--num_processes and --process_id. Every process runs the same command.",
                    flag_values=flag_values)
  flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0's coordinator, "
                      "the same on every process (implies --distributed).",
                      flag_values=flag_values)
  flags.DEFINE_integer("num_processes", None, "Number of processes (with "
                       "--coordinator_address).", flag_values=flag_values)
  flags.DEFINE_integer("process_id", None, "This process's index in 0..num_processes-1 (with "
                       "--coordinator_address).", flag_values=flag_values)


def fail(message: str, code: int = 2):
  """One line on stderr, a non-zero exit, no traceback."""
  import logging as std_logging
  # After a failed checkpoint write, orbax's writer threads still hold failed futures;
  # asyncio would report each one at exit, burying the one line.
  std_logging.getLogger("asyncio").disabled = True
  print(f"error: {message}", file=sys.stderr)
  sys.exit(code)


def no_positional_args(argv) -> None:
  """Every launcher takes --flags only: anything else ends it with one line."""
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}; all options are --flags (see --helpshort)")


def _choice(name: str, value: str, accepted) -> str:
  if value not in accepted:
    fail(f"--{name}={value!r} is not accepted; accepted: {', '.join(accepted)}")
  return value


def _flag_of(path: str) -> str | None:
  if path in FROM_FLAG:
    return f"--{FROM_FLAG[path]}"
  return None if path in NOT_FLAGS else f"--{flag_name(path)}"


def _name_flags(message: str, cls, path: str) -> str:
  """A section's ValueError with its field names spelled as their flags (a name with an
  underscore anywhere, a plain word only where it starts the message)."""
  for f in dataclasses.fields(cls):
    flag = _flag_of(f"{path}.{f.name}" if path else f.name)
    if flag is None:
      continue
    pattern = (rf"(?<![\w-])(?:--)?{f.name}\b" if "_" in f.name else rf"^(?:--)?{f.name}\b")
    message = re.sub(pattern, flag, message)
  return message


def _build(cls, path: str, F):
  kw = {}
  for p, f, _, section in _walk(cls, path):
    if section is not None:
      kw[f.name] = _build(section, p, F)
    elif p in FROM_FLAG:
      kw[f.name] = F[FROM_FLAG[p]].value
    elif p not in NOT_FLAGS:
      value = F[flag_name(p)].value
      kw[f.name] = tuple(value) if isinstance(value, list) else value
  try:
    if cls is configs.ModelConfig:  # the named size's shape with the flags' settings
      return configs.get_model_config(F.model, **kw)
    return cls(**kw)
  except ValueError as e:
    fail(_name_flags(str(e), cls, path))


def build_config(F):
  """Flags -> RunConfig; any invalid value ends the program with one line."""
  from stabjax.train import RunConfig

  _choice("model", F.model, MODEL_CONFIGS)
  for s in run_settings():
    if s.choices and not s.is_list:
      _choice(s.flag, F[s.flag].value, s.choices)
  cfg = _build(RunConfig, "", F)
  # --init_from (experiments/main.py): the checkpoint's positions bound it there instead.
  if cfg.train.seq_len > cfg.model.max_len and not getattr(F, "init_from", None):
    fail(f"--seq_len={cfg.train.seq_len} exceeds {F.model}'s {cfg.model.max_len} positions; "
         f"accepted: 2..{cfg.model.max_len}")
  return cfg


# Accelerator plugins: with none installed (and no JAX_PLATFORMS), JAX runs on the CPU.
_ACCELERATOR_MODULES = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                        "jax_rocm7_plugin")


def _cpu_platform() -> bool:
  """Whether JAX will run on the CPU, decided before any backend starts (initialize() must
  come first)."""
  import importlib.util
  import jax
  platforms = [p for p in (jax.config.jax_platforms or "").split(",") if p]
  if platforms:
    return platforms[0] == "cpu"
  return not any(importlib.util.find_spec(m) for m in _ACCELERATOR_MODULES)


def init_distributed(F) -> None:
  """Join the other processes of a run (--distributed or --coordinator_address).

  Without the coordinator flags `jax.distributed.initialize()` detects the cluster (TPU
  pods, SLURM, Open MPI). On the CPU the processes' collectives go through gloo, so that
  several processes on one machine (the tests) or CPU hosts work too.
  """
  explicit = {"coordinator_address": F.coordinator_address, "num_processes": F.num_processes,
              "process_id": F.process_id}
  given = {k: v for k, v in explicit.items() if v is not None}
  if not F.distributed and not given:
    return
  if given and len(given) < 3:
    missing = ", ".join(f"--{k}" for k in explicit if k not in given)
    fail(f"{', '.join(f'--{k}' for k in given)} also needs {missing}; accepted: all three "
         f"of --coordinator_address=HOST:PORT --num_processes=N --process_id=I, or none")
  if given:
    host, sep, port = F.coordinator_address.rpartition(":")
    if not sep or not host or not port.isdigit():
      fail(f"--coordinator_address={F.coordinator_address!r} is not accepted; accepted: "
           f"HOST:PORT, e.g. 10.0.0.2:8476")
    if F.num_processes < 1:
      fail(f"--num_processes={F.num_processes} is not accepted; accepted: an integer >= 1")
    if not 0 <= F.process_id < F.num_processes:
      fail(f"--process_id={F.process_id} is not accepted; accepted: 0..{F.num_processes - 1}")
  import jax
  if _cpu_platform():
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(**given)
  except (RuntimeError, ValueError) as e:
    fail(f"jax.distributed.initialize failed: {' '.join(str(e).split())[:300]}", code=1)


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
  if cfg.model.dtu.attention == "cudnn" and (jax.default_backend() != "gpu" or
                                              cfg.model.dtype == "float32"):
    fail(f"--dtu_attention=cudnn needs a GPU and --dtype=bfloat16 or float16 (here: "
         f"{jax.default_backend()}, {cfg.model.dtype}); accepted: --dtu_attention=xla")


def prepare_run(F):
  """Validate everything and load the data before anything is written to the workdir."""
  from stabjax.data import DataError, load_dataset

  if not F["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax and TFDS log every save at INFO
  cfg = build_config(F)
  make_logger(F)  # a missing wandb fails here, before the data is built
  compile_cache.enable(F.compilation_cache_dir)
  init_distributed(F)
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


def make_logger(F):
  """The --wandb_project logger, or None (then wandb is never imported)."""
  if not F.wandb_project:
    return None
  from stabjax.logging_wandb import WandbError, WandbLogger
  try:
    return WandbLogger(F.wandb_project, F.wandb_entity)
  except WandbError as e:
    fail(str(e))


def run_and_report(cfg, dataset, workdir: str, init_params=None) -> dict:
  from stabjax.checkpoint import CheckpointError
  from stabjax.run import NonFiniteLossError, WorkdirError, train_and_evaluate
  try:
    summary = train_and_evaluate(cfg, workdir, dataset, show_progress=FLAGS.progress,
                                 logger=make_logger(FLAGS), init_params=init_params)
  except (NonFiniteLossError, WorkdirError, CheckpointError) as e:
    fail(str(e), code=1)
  import jax
  from stabjax import paths
  if jax.process_index() != 0:  # one report, from the process that wrote the workdir
    return summary
  workdir = str(paths.absolute(workdir))
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
  make_logger(F)
  compile_cache.enable(F.compilation_cache_dir)
  init_distributed(F)
  check_mesh(cfg)
  return cfg


def sweep(runs, workdir: str, reuse_from=()) -> list[dict]:
  """stabjax.sweep.run_sweep with the launcher's error handling; exits if a run stopped."""
  from stabjax import sweep as sweep_lib
  from stabjax.data import DataError
  from stabjax.checkpoint import CheckpointError
  from stabjax import run as run_lib
  from stabjax.run import NonFiniteLossError, WorkdirError
  logger = make_logger(FLAGS)
  # Looked up now (not at import): tests stand in for train_and_evaluate.
  train = (None if logger is None else
           lambda *a, **kw: run_lib.train_and_evaluate(*a, logger=logger, **kw))
  try:
    summaries = sweep_lib.run_sweep(runs, workdir, show_progress=FLAGS.progress,
                                    reuse_from=reuse_from, train=train)
  except (DataError, NonFiniteLossError, ValueError, WorkdirError, CheckpointError) as e:
    fail(str(e), code=1)
  if len(summaries) < len(runs) or summaries[-1]["status"] != "finished":
    print("sweep interrupted: run the same command again to continue")
    sys.exit(1)
  return summaries


def alpha_label(a: float) -> str:
  return f"α={a:g}"


def write_report(write, *args) -> None:
  """A sweep's outputs: `write(*args)` writes them and returns their paths, the first a
  markdown table, printed. Process 0 alone: in a multi-process sweep every process ran the
  same runs, and the others would write the same files over it."""
  from stabjax import run as run_lib
  if not run_lib.is_primary():
    return
  paths = write(*args)
  print(open(paths[0]).read())
  print("wrote " + ", ".join(paths))


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
