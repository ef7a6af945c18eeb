r"""Generate from a checkpoint of a run, with the run's own tokenizer.

  python experiments/sample.py --workdir=runs/main --prompt="the cat" --decoder=nucleus \
      --num=4 --max_new_tokens=32 --seed=0 [--step=N]

The run is rebuilt from WORKDIR/config.json (model, units, tokenizer); the decoders are
those of the end-of-run measurement (`stabjax.degeneration.DECODERS`) with the run's
--temperature / --top_k / --top_p. Each continuation is printed as
'[i] PROMPT ‖ CONTINUATION'. The prompt is encoded after a BOS token, as in training.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import common  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "The training run's workdir.")
flags.DEFINE_string("prompt", "", "Text to continue (empty: from BOS alone).")
flags.DEFINE_string("decoder", "sample", "sample, greedy, top_k or nucleus.")
flags.DEFINE_integer("num", 4, "Continuations to generate.")
flags.DEFINE_integer("max_new_tokens", 32, "Tokens per continuation.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")


def main(argv):
  from stabjax.degeneration import DECODERS
  common.no_positional_args(argv)
  if not FLAGS.workdir:
    common.fail("--workdir is required")
  if FLAGS.decoder not in DECODERS:
    common.fail(f"--decoder={FLAGS.decoder!r} is not accepted; accepted: {', '.join(DECODERS)}")
  for name in ("num", "max_new_tokens"):
    if FLAGS[name].value < 1:
      common.fail(f"--{name}={FLAGS[name].value} is not accepted; accepted: an integer >= 1")
  import jax
  import numpy as np
  from absl import logging

  from stabjax import degeneration
  from stabjax import workdir as workdir_lib
  from stabjax.data import DataError
  from stabjax.run import WorkdirError
  logging.set_verbosity(logging.WARNING)
  try:
    cfg = workdir_lib.load_config(FLAGS.workdir)
    tok = workdir_lib.run_tokenizer(cfg)
    ids = [tok.bos_id] + tok.encode(FLAGS.prompt)
    total = len(ids) + FLAGS.max_new_tokens
    if total > cfg.model.max_len:
      common.fail(f"the prompt's {len(ids)} tokens (with BOS) + --max_new_tokens="
                  f"{FLAGS.max_new_tokens} exceed the model's {cfg.model.max_len} positions")
    step, trainer, params = workdir_lib.restore_params(FLAGS.workdir, cfg, tok, FLAGS.step)
  except (WorkdirError, DataError, ValueError) as e:
    common.fail(str(e))
  prompts = np.tile(np.asarray(ids, np.int32), (FLAGS.num, 1))
  scfg = degeneration.decoder_config(cfg.generation, FLAGS.decoder, FLAGS.max_new_tokens)
  out = degeneration._sample(trainer.model, cfg.model.causal, params, prompts,
                             np.ones_like(prompts), jax.random.PRNGKey(FLAGS.seed), scfg, tok,
                             cfg.generation.batch_size)
  print(f"step {step} of {os.path.abspath(FLAGS.workdir)}, decoder {FLAGS.decoder}:")
  for i, row in enumerate(degeneration._generated_ids(out, len(ids))):
    print(f"[{i}] {FLAGS.prompt} ‖ {tok.decode(row)}")
  return 0


if __name__ == "__main__":
  app.run(main)
