r"""Export a stabjax checkpoint as a Hugging Face checkpoint (GPT2LMHeadModel / BertForMaskedLM).

  python experiments/export.py --workdir=runs/main --out=/tmp/hf_model [--step=N]

OUT gets config.json and model.safetensors, which `transformers.AutoModelForCausalLM` /
`GPT2LMHeadModel` (GPT-2) or `BertForMaskedLM` (BERT) load with the logits of the
stabjax model in evaluation mode: the DMU's evaluation-time weight scaling (keep
probability p per masked quantity, unless --dmu_rescale) is folded into the MLP weights
(`stabjax.models.hf.fold_dmu_eval`); the DTU evaluates as exact attention. The
tokenizer (`stabjax.data.tokenizer.export_hf_tokenizer`): a run started with
--init_from gets its Hugging Face tokenizer files copied; a SentencePiece run gets
tokenizer.json converted from it (checked to encode alike; `AutoTokenizer` loads it)
and its tokenizer.model; synthetic data has no exportable tokenizer.
stabjax_export.json records the source run, step and what was exported.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import common  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "The training run's workdir.")
flags.DEFINE_string("out", None, "Directory to write the Hugging Face checkpoint to (new or "
                    "empty).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")


def main(argv):
  common.no_positional_args(argv)
  if not FLAGS.workdir or not FLAGS.out:
    common.fail("--workdir and --out are required")
  out = os.path.abspath(FLAGS.out)
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    common.fail(f"--out={FLAGS.out} exists and is not an empty directory; choose a new one")
  from absl import logging

  from stabjax import workdir as workdir_lib
  from stabjax.data import DataError
  from stabjax.data.tokenizer import export_hf_tokenizer
  from stabjax.models import hf
  from stabjax.run import WorkdirError
  logging.set_verbosity(logging.WARNING)
  try:
    cfg = workdir_lib.load_config(FLAGS.workdir)
    tok = workdir_lib.run_tokenizer(cfg)
    step, _, params = workdir_lib.restore_params(FLAGS.workdir, cfg, tok, FLAGS.step)
  except (WorkdirError, DataError, ValueError) as e:
    common.fail(str(e))
  files = hf.save_hf(params, cfg.model, out, bos_id=tok.bos_id, eos_id=tok.eos_id,
                     pad_id=tok.pad_id)
  tokenizer = export_hf_tokenizer(tok, out)
  d = cfg.model.dmu
  record = {"workdir": os.path.abspath(FLAGS.workdir), "step": step, "model": cfg.model.name,
            "arch": cfg.model.arch, "tokenizer": tokenizer,
            "dmu_folded": bool(d.enabled and d.c_tilde < 1 and not d.rescale),
            "dmu": {"enabled": d.enabled, "c_tilde": d.c_tilde, "mode": d.mode,
                    "rescale": d.rescale}}
  with open(os.path.join(out, "stabjax_export.json"), "w") as f:
    json.dump(record, f, indent=2)
  print(f"exported step {step} of {os.path.abspath(FLAGS.workdir)} to {out}: "
        f"{', '.join(files)}; tokenizer: {tokenizer}")
  return 0


if __name__ == "__main__":
  app.run(main)
