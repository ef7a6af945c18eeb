r"""Tokens/s of KV-cache generation against recomputing the sequence every step.

Times `stabjax.sampling.generate` and `generate_no_cache` on a random-init model, in
the same process, after a warm-up call that compiles both: the median of --repeats
timed calls (each ended by `block_until_ready`), as generated tokens per second.
`stop_at_eos` is off so both always produce exactly --new_tokens per row.

  python benchmarks/generate.py                       # gpt2_tiny, CPU
  python benchmarks/generate.py --batch=1 --new_tokens=512
"""

from __future__ import annotations

import os
import statistics
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

flags.DEFINE_string("model", "gpt2_tiny", "A GPT-2 model name from stabjax.configs.")
flags.DEFINE_integer("batch", 8, "Prompts per call.")
flags.DEFINE_integer("prompt_len", 16, "Prompt length P.")
flags.DEFINE_integer("new_tokens", 256, "Generated tokens N per prompt.")
flags.DEFINE_integer("repeats", 5, "Timed calls per sampler (the median is reported).")
flags.DEFINE_boolean("no_cache", True, "Also time the no-cache baseline.")
flags.DEFINE_integer("seed", 0, "Init and sampling seed.")
flags.DEFINE_string("dtype", "float32", "Compute dtype (bfloat16 on accelerators; there the "
                    "two samplers' tokens may differ by rounding).")
FLAGS = flags.FLAGS


def _time(fn, repeats: int) -> tuple[float, float]:
  """(compile + first call seconds, median seconds of `repeats` later calls)."""
  t0 = time.perf_counter()
  fn().tokens.block_until_ready()
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn().tokens.block_until_ready()
    times.append(time.perf_counter() - t0)
  return first, statistics.median(times)


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  from stabjax import configs, sampling
  from stabjax.models import get_model, init_params

  p, n, b = FLAGS.prompt_len, FLAGS.new_tokens, FLAGS.batch
  base = configs.get_model_config(FLAGS.model, dtype=FLAGS.dtype)
  # Random init: the position table only needs to cover P + N.
  cfg = base.replace(max_len=max(base.max_len, p + n))
  model = get_model(cfg)
  params = jax.jit(lambda k: init_params(cfg, k))(jax.random.key(FLAGS.seed))
  prompts = jax.random.randint(jax.random.key(FLAGS.seed + 1), (b, p), 4, cfg.vocab_size)
  key = jax.random.key(FLAGS.seed + 2)
  scfg = sampling.SamplingConfig(max_new_tokens=n, stop_at_eos=False)
  run = lambda f: lambda: f(model, params, prompts, None, key, scfg, eos_id=2, pad_id=0)

  print(f"{cfg.name} ({cfg.dtype}): d={cfg.d_model} layers={cfg.num_layers} "
        f"vocab={cfg.vocab_size}; "
        f"batch {b}, prompt {p}, new tokens {n}; {jax.devices()[0].platform} "
        f"x{jax.device_count()}")
  first, cached = _time(run(sampling.generate), FLAGS.repeats)
  tps = b * n / cached
  print(f"  generate (KV cache):  {tps:10.0f} tokens/s  (median {cached:.3f} s, "
        f"first call {first:.1f} s)")
  if FLAGS.no_cache:
    first, plain = _time(run(sampling.generate_no_cache), FLAGS.repeats)
    print(f"  generate_no_cache:    {b * n / plain:10.0f} tokens/s  (median {plain:.3f} s, "
          f"first call {first:.1f} s)")
    print(f"  speed-up of the cache: {plain / cached:.1f}x")
    same = jnp.array_equal(run(sampling.generate)().tokens,
                           run(sampling.generate_no_cache)().tokens)
    print(f"  same tokens: {bool(same)}")


if __name__ == "__main__":
  app.run(main)
