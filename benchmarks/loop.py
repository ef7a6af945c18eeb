r"""Host overhead of the training loop (`run.train_and_evaluate`) over the bare jitted step.

The loop adds, per step, the data iterator, `put_batch`, the metrics read (a host round
trip), the NaN check, tqdm and logging. Its per-step time is measured as

  (wall(--steps + --extra_steps) - wall(--steps)) / --extra_steps

over two fresh runs of `train_and_evaluate` (synthetic data, evaluation, checkpoint and
the generation metrics only at the end, so they cancel; XLA's persistent compilation
cache makes the second compile of the same step a cache hit). The baseline is the bare
step: consecutive `trainer.train_step` calls on one device-resident batch, ended by
`block_until_ready`. Rounds (bare, short run, long run) repeat --repeats times
(`benchmarks.common.time_interleaved`); medians.

The loop is timed with and without `--lagged_metrics` (metrics read one step late).

  python benchmarks/loop.py                 # gpt2_tiny, batch 8 x 64
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

flags.DEFINE_string("model", "gpt2_tiny", "A model name from stabjax.configs.")
flags.DEFINE_integer("batch_size", 8, "Global batch (sequences per step).")
flags.DEFINE_integer("seq_len", 64, "Sequence length.")
flags.DEFINE_integer("steps", 20, "Steps of the short run.")
flags.DEFINE_integer("extra_steps", 200, "Extra steps of the long run.")
flags.DEFINE_integer("repeats", 3, "Rounds (median reported).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  import jax
  import jax.numpy as jnp
  from stabjax import configs, degeneration
  from stabjax.data import DataConfig, load_dataset, make_iterator
  from stabjax.run import special_ids, train_and_evaluate
  from stabjax.train import RunConfig, Trainer
  from benchmarks import common

  cache_dir = tempfile.mkdtemp(prefix="stabjax_loop_cache_")
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

  b, t = FLAGS.batch_size, FLAGS.seq_len
  dataset = load_dataset(DataConfig(spec="synthetic", seq_len=t), seed=0)
  model = configs.get_model_config(FLAGS.model).replace(vocab_size=dataset.tokenizer.vocab_size)

  def run_config(steps: int, lagged: bool = False) -> RunConfig:
    train = configs.TrainConfig(batch_size=b, seq_len=t, steps=steps, warmup_steps=5,
                                eval_every=steps, eval_batches=1, checkpoint_every=steps,
                                lagged_metrics=lagged)
    gen = degeneration.GenerationEvalConfig(num_samples=2, prompt_len=4, max_new_tokens=4)
    return RunConfig(model=model, train=train, generation=gen)

  trainer = Trainer.create(run_config(10**6), special_ids(dataset.tokenizer))
  holder = {"state": trainer.init_state()}
  batch = trainer.put_batch(next(make_iterator(dataset, "train", b, 0)))
  neg_log_freq = jnp.asarray(dataset.neg_log_freq, jnp.float32)

  def bare():
    state = holder["state"]
    for _ in range(FLAGS.extra_steps):  # the step donates its state: thread it through
      state, metrics = trainer.train_step(state, batch, neg_log_freq)
    holder["state"] = state
    return metrics

  def run(steps: int, lagged: bool = False) -> None:
    with tempfile.TemporaryDirectory() as workdir:
      train_and_evaluate(run_config(steps, lagged), workdir, dataset, show_progress=False)

  print(f"# {model.name}, batch {b} x seq {t}; {common.machine_description()}")
  # The warm-up call compiles the bare step and fills the compilation cache for the runs.
  timings = common.time_interleaved(
      {"bare": bare, "short": lambda: run(FLAGS.steps),
       "long": lambda: run(FLAGS.steps + FLAGS.extra_steps),
       "short lagged": lambda: run(FLAGS.steps, lagged=True),
       "long lagged": lambda: run(FLAGS.steps + FLAGS.extra_steps, lagged=True)},
      repeats=FLAGS.repeats)
  per_step = lambda sh, lo: [(y - x) / FLAGS.extra_steps  # noqa: E731
                             for x, y in zip(timings[sh].times_s, timings[lo].times_s)]
  samples = {"bare step": [x / FLAGS.extra_steps for x in timings["bare"].times_s],
             "train_and_evaluate": per_step("short", "long"),
             "train_and_evaluate --lagged_metrics": per_step("short lagged", "long lagged")}
  base = statistics.median(samples["bare step"])
  rows = [[name, f"{1e3 * statistics.median(s):.2f}",
           f"{1e3 * min(s):.2f}-{1e3 * max(s):.2f}", f"{statistics.median(s) / base:.3f}x"]
          for name, s in samples.items()]
  print(common.markdown_table(["per step", "median ms", "range ms", "vs bare"], rows))


if __name__ == "__main__":
  app.run(main)
