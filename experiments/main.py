r"""One stabjax run: train under feedback strength alpha, evaluate, write the workdir.

With no flags it runs the offline default (synthetic language, gpt2_tiny, a few minutes on
a laptop CPU):

  python experiments/main.py --workdir=/tmp/stabjax_run
  python experiments/main.py --alpha=0.2 --model=gpt2_2b --data=tfds:lm1b --mesh=data=1,fsdp=-1,tensor=1
  python experiments/main.py --init_from=/models/gpt2 --data=text:corpus.txt --alpha=0.1

--init_from=DIR fine-tunes a local Hugging Face GPT-2 / BERT checkpoint (config.json +
model.safetensors or pytorch_model.bin, and its tokenizer: tokenizer.json, or
vocab.json + merges.txt, or vocab.txt). The model's shape comes from DIR/config.json, so
--model and --vocab_size are refused with it; --dmu/--dtu/--dtype/--scan_layers/--remat
still apply; dropout is the checkpoint's. The data (text: or tfds:) is tokenized with
DIR's tokenizer (`stabjax.data.tokenizer.HFTokenizer`, which documents its special ids).

Every bad flag value ends the program with one line naming the flag and the accepted
values, a non-zero exit, and nothing written to the workdir.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import common  # noqa: E402

FLAGS = flags.FLAGS
common.define_run_flags()
flags.adopt_module_key_flags(common)  # --helpshort lists the run flags
flags.DEFINE_string("workdir", "runs/main", "Where config, metrics, checkpoints and summary go.")
flags.DEFINE_string("init_from", None, "A local Hugging Face GPT-2 / BERT checkpoint directory "
                    "to start from, with its tokenizer (the model's shape comes from its "
                    "config.json; text: or tfds: data).")


def prepare_init_from(F):
  """`common.prepare_run` for --init_from: (cfg, dataset, params), all checked before
  anything is written to the workdir."""
  import dataclasses

  from absl import logging

  from stabjax.data import DataError, load_dataset
  from stabjax.data.tokenizer import HFTokenizer
  from stabjax.models import hf
  from stabjax.run import resolve_feedback_target

  if not F["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  for name in ("model", "vocab_size"):
    if F[name].present:
      common.fail(f"--{name} does not apply with --init_from: the model's shape and "
                  f"vocabulary come from {F.init_from}/config.json and its tokenizer")
  cfg = common.build_config(F)
  path = os.path.abspath(os.path.expanduser(F.init_from))
  if cfg.data.data_spec.kind == "synthetic":
    common.fail(f"--init_from needs text: or tfds: data (tokenized with its tokenizer), got "
                f"--data={cfg.data.spec}")
  m = cfg.model
  try:
    model = hf.config_from_hf(hf.read_config(path), f"hf:{os.path.basename(path)}",
                              dtype=m.dtype, scan_layers=m.scan_layers, dmu=m.dmu, dtu=m.dtu)
  except ValueError as e:
    common.fail(f"--init_from={F.init_from}: {e}")
  model = model.replace(remat=m.remat)
  if cfg.train.seq_len > model.max_len:
    common.fail(f"--seq_len={cfg.train.seq_len} exceeds the {model.max_len} positions of "
                f"--init_from={F.init_from}; accepted: 2..{model.max_len}")
  if F.distributed:
    import jax
    jax.distributed.initialize()
  common.check_mesh(cfg)
  try:
    tokenizer = HFTokenizer(path, model_vocab_size=model.vocab_size, model_type=model.arch)
    params = hf.load_params(path, model)
    dataset = load_dataset(cfg.data, seed=cfg.train.seed, tokenizer=tokenizer)
  except DataError as e:
    common.fail(str(e))
  except ValueError as e:
    common.fail(f"--init_from={F.init_from}: {e}")
  cfg = dataclasses.replace(cfg, model=model, init_from=path,
                            data=dataclasses.replace(cfg.data, vocab_size=model.vocab_size))
  try:
    cfg = resolve_feedback_target(cfg, dataset)
  except ValueError as e:
    common.fail(str(e))
  return cfg, dataset, params


def main(argv):
  common.no_positional_args(argv)
  if FLAGS.init_from:
    cfg, dataset, params = prepare_init_from(FLAGS)
  else:
    cfg, dataset, params = (*common.prepare_run(FLAGS), None)
  summary = common.run_and_report(cfg, dataset, FLAGS.workdir, init_params=params)
  return 0 if summary["status"] in ("finished", "preempted") else 1


if __name__ == "__main__":
  app.run(main)
