r"""Recompute a checkpoint's degeneration metrics without training.

  python experiments/evaluate.py --workdir=runs/main [--step=N]

The run is rebuilt from WORKDIR/config.json; `stabjax.degeneration.measure` runs over the
run's decoders with its generation settings (same prompts, same seed), and the
validation loss with `run.evaluate`. Writes WORKDIR/eval_step<N>.json ({'step',
'validation', 'generation'}) and eval_step<N>_samples.txt, and prints the table. At the
final step the 'generation' metrics equal summary.json's.
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
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")


def main(argv):
  common.no_positional_args(argv)
  if not FLAGS.workdir:
    common.fail("--workdir is required")
  from absl import logging

  from stabjax import degeneration, run
  from stabjax import workdir as workdir_lib
  from stabjax.data import DataError
  logging.set_verbosity(logging.WARNING)
  try:
    cfg = workdir_lib.load_config(FLAGS.workdir)
    if not workdir_lib.checkpoint_steps(FLAGS.workdir):  # before loading the data
      raise run.WorkdirError(f"{FLAGS.workdir} has no checkpoint (checkpoints/ is empty or "
                             f"missing)")
    dataset = workdir_lib.load_run_dataset(cfg)
    step, trainer, params = workdir_lib.restore_params(FLAGS.workdir, cfg, dataset.tokenizer,
                                                       FLAGS.step)
  except (run.WorkdirError, DataError, ValueError) as e:
    common.fail(str(e))
  validation = run.evaluate(trainer, params, dataset, cfg)
  generation, texts = degeneration.measure(trainer.model, params, dataset, cfg.generation)
  path = os.path.join(FLAGS.workdir, f"eval_step{step}.json")
  try:
    run._write_file(path, json.dumps({"step": step, "validation": validation,
                                      "generation": generation}, indent=2))
    run._write_file(os.path.join(FLAGS.workdir, f"eval_step{step}_samples.txt"),
                    degeneration.format_samples(texts))
  except run.WorkdirError as e:
    common.fail(str(e), code=1)
  print(common.metrics_table({"final": validation, "generation": generation}))
  print(f"step {step}: {os.path.abspath(path)}")
  return 0


if __name__ == "__main__":
  app.run(main)
