r"""One stabjax run: train under feedback strength alpha, evaluate, write the workdir.

With no flags it runs the offline default (synthetic language, gpt2_tiny, a few minutes on
a laptop CPU):

  python experiments/main.py --workdir=/tmp/stabjax_run
  python experiments/main.py --alpha=0.2 --model=gpt2_2b --data=tfds:lm1b --mesh=data=1,fsdp=-1,tensor=1

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


def main(argv):
  if len(argv) > 1:
    common.fail(f"unexpected arguments {argv[1:]}; all options are --flags (see --helpshort)")
  cfg, dataset = common.prepare_run(FLAGS)
  summary = common.run_and_report(cfg, dataset, FLAGS.workdir)
  return 0 if summary["status"] in ("finished", "preempted") else 1


if __name__ == "__main__":
  app.run(main)
