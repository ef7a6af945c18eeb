r"""Tokens/s of the jitted BAARA train step with the features switched on one by one.

Builds one `Trainer` per configuration of the same model (SPEC 7), all in this process,
then times them round-robin (plain, +feedback, ..., plain, +feedback, ...) so that load
from other processes hits every configuration alike; each sample is --steps consecutive
train steps ended by `block_until_ready`, the table shows the median per step.

Configurations (cumulative where the name starts with '+'):

  plain            alpha=0, PSU off, DMU off, DTU off (plain MLE)
  +feedback        alpha=0.2 (SPEC 5)
  +PSU linear      PSU with the first-order value -<g, u> (SPEC 6)
  PSU exact        feedback + PSU with the exact value (a second forward on the batch)
  +DMU             feedback + PSU linear + DMU dfix c~=0.5
  +DTU (all on)    feedback + PSU linear + DMU dfix c~=0.5 + DTU keep=seq/4
  all on, exact    as above with PSU exact
  PSU linear only, DMU only, DTU only: one feature on a plain step, for attribution.
  plain + cuDNN attention   cuDNN flash attention (GPU in bfloat16/float16 only; elsewhere
                   skipped)

Model FLOPs per token (the PaLM-style MFU formula, SPEC 7):

  6 N + 12 L d T

N counts every parameter except the position embeddings (a table lookup, no matmul);
the token embedding is counted once, since the tied output projection is a d x V
matmul. 12 L d T is the attention's score (QK^T) and value (PV) matmuls, forward and
backward, with T = seq_len and *no causal halving* (every one of the T x T scores). The
same dense-model FLOPs are used for every row, so for rows with DMU/DTU (which skip
work) the FLOP/s are effective rates; the c~ column gives the forward matmul share
actually done (`feedback.learning_complexity`). MFU = FLOP/s over the device's dense
bf16 peak (`stabjax.throughput.PEAK_TFLOPS`); on CPU the peak is unknown and only the
achieved TFLOP/s are printed.

  python benchmarks/step.py                          # gpt2_tiny, batch 16 x 256
  python benchmarks/step.py --model=gpt2_small --batch_size=4 --seq_len=512 --steps=2
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from stabjax.throughput import model_flops_per_token  # noqa: E402

flags.DEFINE_string("model", "gpt2_tiny", "A model name from stabjax.configs.")
flags.DEFINE_integer("batch_size", 16, "Global batch (sequences per step).")
flags.DEFINE_integer("seq_len", 256, "Sequence length T (at most the model's max_len).")
flags.DEFINE_integer("steps", 4, "Consecutive train steps per timed sample.")
flags.DEFINE_integer("repeats", 7, "Timed samples per configuration (median reported).")
flags.DEFINE_string("only", "", "Comma-separated configuration names to run (default all); "
                    "a name that matches none is an error.")
flags.DEFINE_string("dtype", "float32", "Compute dtype (bfloat16 on accelerators).")
flags.DEFINE_bool("remat", False, "Rematerialise blocks in the backward pass (large models).")
flags.DEFINE_bool("scan_layers", False, "Stack blocks with nn.scan (large models).")
FLAGS = flags.FLAGS


# Run only on a GPU in bfloat16/float16; elsewhere skipped with a note, so that one
# --only list (benchmarks/accelerator.sh's) serves GPUs and TPUs alike.
GPU_ONLY = ("plain + cuDNN attention",)


def _configurations(seq_len: int):
  """[(name, ModelConfig overrides, TrainConfig overrides, PSUConfig kwargs)]."""
  from stabjax import configs
  dmu = configs.DMUConfig(enabled=True, c_tilde=0.5, mode="dfix")
  dtu = configs.DTUConfig(enabled=True, keep=max(1, seq_len // 4))
  off = {"enabled": False}
  lin = {"enabled": True, "value": "linear"}
  exact = {"enabled": True, "value": "exact"}
  fb = {"alpha": 0.2}
  plain = {"alpha": 0.0}
  return [
      ("plain", {}, plain, off),
      ("+feedback", {}, fb, off),
      ("+PSU linear", {}, fb, lin),
      ("PSU linear only", {}, plain, lin),
      ("PSU exact (fb + exact)", {}, fb, exact),
      ("+DMU dfix c~=0.5", {"dmu": dmu}, fb, lin),
      ("+DTU keep=T/4 (all on)", {"dmu": dmu, "dtu": dtu}, fb, lin),
      ("all on + PSU exact", {"dmu": dmu, "dtu": dtu}, fb, exact),
      ("DMU only", {"dmu": dmu}, plain, off),
      ("DTU only", {"dtu": dtu}, plain, off),
      ("plain + cuDNN attention", {"dtu": configs.DTUConfig(enabled=False, attention="cudnn")},
       plain, off),
  ]


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np
  from stabjax import configs, feedback, sharding
  from stabjax.psu import PSUConfig
  from stabjax.train import RunConfig, SpecialIds, Trainer
  from benchmarks import common

  ids = SpecialIds(pad=0, bos=1, eos=2, mask=3)
  b, t = FLAGS.batch_size, FLAGS.seq_len
  base = configs.get_model_config(FLAGS.model, dtype=FLAGS.dtype, remat=FLAGS.remat,
                                  scan_layers=FLAGS.scan_layers)
  if t > base.max_len:
    raise app.UsageError(f"--seq_len={t} exceeds {base.name}'s max_len={base.max_len}")
  wanted = [s.strip() for s in FLAGS.only.split(",") if s.strip()]
  every = _configurations(t)
  unknown = [w for w in wanted if w not in [r[0] for r in every]]
  if unknown:
    raise app.UsageError(f"--only: no configuration {', '.join(map(repr, unknown))}; accepted: "
                         f"{', '.join(r[0] for r in every)}")
  rows = [r for r in every if not wanted or r[0] in wanted]
  if jax.default_backend() != "gpu" or FLAGS.dtype == "float32":
    skipped = [r[0] for r in rows if r[0] in GPU_ONLY]
    rows = [r for r in rows if r[0] not in GPU_ONLY]
    if skipped and wanted:
      print(f"# skipped (a GPU with --dtype=bfloat16 or float16 only): {', '.join(skipped)}")
  if not rows or rows[0][0] != "plain":
    rows = [r for r in every if r[0] == "plain"] + rows

  rng = np.random.default_rng(0)
  tokens = rng.integers(4, base.vocab_size, (b, t)).astype(np.int32)
  tokens[:, 0] = ids.bos
  host_batch = {"tokens": tokens, "mask": np.ones_like(tokens)}
  counts = np.bincount(tokens.reshape(-1), minlength=base.vocab_size)
  neg_log_freq = feedback.neg_log_unigram_freq(counts)

  print(f"# {base.name}: d={base.d_model} layers={base.num_layers} heads={base.num_heads} "
        f"vocab={base.vocab_size} dtype={base.dtype}; batch {b} x seq {t} = {b * t} tokens/step")
  print(f"# {common.machine_description()}")
  print(f"# {FLAGS.repeats} interleaved samples of {FLAGS.steps} steps each per configuration")

  thunks, c_tildes, step_gib = {}, {}, {}
  for name, model_kw, train_kw, psu_kw in rows:
    model_cfg = base.replace(**model_kw)
    train_cfg = configs.TrainConfig(batch_size=b, seq_len=t, steps=10_000, warmup_steps=10,
                                    **train_kw)
    cfg = RunConfig(model=model_cfg, train=train_cfg, psu=PSUConfig(**psu_kw))
    trainer = Trainer.create(cfg, ids)
    # Compiled ahead of time once: the executable that is timed is the one whose memory
    # (XLA's buffer assignment: arguments + temporaries, per device) is reported.
    step = trainer.lower_train_step().compile()
    mem = step.memory_analysis()
    if mem is not None:
      step_gib[name] = (mem.argument_size_in_bytes + mem.temp_size_in_bytes) / 2**30
    holder = {"state": trainer.init_state()}
    batch = trainer.put_batch(host_batch)
    freq = jax.device_put(jnp.asarray(neg_log_freq, jnp.float32),
                          sharding.replicated(trainer.mesh))

    def run(step=step, holder=holder, batch=batch, freq=freq, scalars=trainer.scalars):
      state = holder["state"]
      for _ in range(FLAGS.steps):  # the step donates its state: thread it through
        state, metrics = step(state, batch, freq, scalars)
      holder["state"] = state
      return metrics["loss"]

    thunks[name] = run
    c_tildes[name] = trainer.c_tilde

  timings = common.time_interleaved(thunks, repeats=FLAGS.repeats, warmup=2)
  flops_tok, n_params = model_flops_per_token(base, t)
  peak = common.peak_tflops()
  plain = timings["plain"].median_s
  header = ["configuration", "c~", "step ms", "tokens/s", "vs plain", "model TFLOP/s"]
  if peak is not None:
    header.append("MFU")
  if step_gib:
    header.append("step GiB/device")
  table = []
  for name, timing in timings.items():
    step_s = timing.median_s / FLAGS.steps
    tps = b * t / step_s
    tflops = flops_tok * tps / 1e12
    row = [name, f"{c_tildes[name]:.3f}", f"{1e3 * step_s:.1f}", f"{tps:,.0f}",
           f"{timing.median_s / plain:.2f}x", f"{tflops:.4f}"]
    if peak is not None:
      row.append(f"{100 * tflops / (peak * jax.device_count()):.1f}%")
    if step_gib:
      row.append(f"{step_gib.get(name, float('nan')):.2f}")
    table.append(row)
  print()
  print(common.markdown_table(header, table))
  print()
  ms = lambda x: f"{1e3 * x / FLAGS.steps:.1f}"
  spread = {n: f"{ms(min(t_.times_s))}-{ms(max(t_.times_s))}" for n, t_ in timings.items()}
  print("step ms range over samples: " + "; ".join(f"{n}: {s}" for n, s in spread.items()))
  print(f"first call (compile + {FLAGS.steps} step(s)) s: " +
        "; ".join(f"{n}: {t_.first_s:.1f}" for n, t_ in timings.items()))
  print(f"model FLOPs/token = 6 N + 12 L d T = 6 x {n_params:,} + 12 x {base.num_layers} x "
        f"{base.d_model} x {t} = {flops_tok:,.0f} (no causal halving; N without position "
        f"embeddings)")
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    print(f"peak device memory of this process (all configurations): "
          f"{stats['peak_bytes_in_use'] / 2**30:.2f} GiB")
  if step_gib:
    print("step GiB/device: the compiled step's arguments + temporaries (XLA buffer assignment)")
  if peak is None:
    print(f"MFU: peak of {jax.devices()[0].device_kind!r} unknown (CPU): "
          "achieved TFLOP/s only")
  else:
    print(f"MFU = model FLOP/s / ({peak:.0f} TFLOP/s dense bf16 peak x "
          f"{jax.device_count()} devices)")


if __name__ == "__main__":
  app.run(main)
