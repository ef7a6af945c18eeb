r"""Forward+backward time of the DMU and DTU units against their dense counterparts.

DMU (SPEC 3): the `DMU` module, mode `dfix`, on x [tokens, d_model], gradients with
respect to the parameters and x, at c~ in --c_tildes, against the same module switched
off (the dense MLP). dfix gathers floor(c~ d) x floor(c~ d_ff) weights, so the matmul
FLOPs are c~^2 of dense.

DTU (SPEC 4): `dtu.sampled_attention` (causal, key-norm scores, the module's training
path) on q, k, v [batch, n, heads, head_dim], gradients with respect to q, k, v,
against dense causal attention (`dtu.full_attention`, the evaluation path). Each keep
in --keeps (n/16, n/8 or a number) runs with both implementations, 'gathered' (the
keep keys per query, O(n keep Dh)) and 'dense' (a masked softmax over all n keys,
O(n^2 Dh)); `auto` picks dense when n < dtu.DENSE_BELOW * keep. 'sample only' times the
gathered path's blockwise Gumbel-top-k alone (forward only, no attention).

Candidates for one size run round-robin (`benchmarks.common.time_interleaved`); the
median of --repeats is shown with its ratio to the dense baseline (> 1: slower).

  python benchmarks/units.py                                   # both units
  python benchmarks/units.py --unit=dtu --seq_lens=512,2048 --keeps=n/16
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

flags.DEFINE_enum("unit", "both", ["both", "dmu", "dtu"], "Which unit to time.")
flags.DEFINE_integer("d_model", 512, "DMU: model width d.")
flags.DEFINE_integer("d_ff", 2048, "DMU: hidden width d_ff.")
flags.DEFINE_integer("tokens", 4096, "DMU: tokens per call (batch 8 x tokens/8).")
flags.DEFINE_string("c_tildes", "0.25,0.5,0.75", "DMU: retentions c~ to time.")
flags.DEFINE_integer("batch", 1, "DTU: batch size.")
flags.DEFINE_integer("heads", 4, "DTU: attention heads.")
flags.DEFINE_integer("head_dim", 32, "DTU: head dimension.")
flags.DEFINE_string("seq_lens", "512,1024,2048,4096,8192", "DTU: sequence lengths n.")
flags.DEFINE_string("keeps", "n/16,n/8,64", "DTU: keys per query, 'n/K' or a number.")
flags.DEFINE_integer("block_q", 256, "DTU: queries per block (DTUConfig.block_q).")
flags.DEFINE_integer("max_dense_impl_n", 4096,
                     "DTU: above this n, run the 'dense' implementation only where auto picks it.")
flags.DEFINE_integer("repeats", 5, "Timed samples per candidate (median reported).")
FLAGS = flags.FLAGS


def _keep(spec: str, n: int) -> int:
  spec = spec.strip()
  if spec.startswith("n/"):
    return max(1, n // int(spec[2:]))
  return int(spec)


def bench_dmu() -> None:
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from stabjax.configs import DMUConfig
  from stabjax.models.dmu import DMU, num_kept
  from benchmarks import common

  d, f, tokens = FLAGS.d_model, FLAGS.d_ff, FLAGS.tokens
  x = jax.random.normal(jax.random.key(0), (8, tokens // 8, d))
  cot = jax.random.normal(jax.random.key(1), x.shape)
  key = jax.random.key(2)

  def thunk(config: DMUConfig):
    module = DMU(f, config)
    params = nn.meta.unbox(module.init(jax.random.key(3), x)["params"])

    def loss(params, x, key):
      y = module.apply({"params": params}, x, deterministic=False, rngs={"dmu": key})
      return jnp.sum(y * cot)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return lambda: grad(params, x, key)

  c_tildes = [float(c) for c in FLAGS.c_tildes.split(",")]
  fns = {"dense": thunk(DMUConfig(enabled=False))}
  for c in c_tildes:
    fns[f"dfix c~={c}"] = thunk(DMUConfig(enabled=True, c_tilde=c, mode="dfix"))
  print(f"\n## DMU dfix vs dense MLP, forward+backward: d={d}, d_ff={f}, {tokens} tokens")
  print(f"# {common.machine_description()}")
  timings = common.time_interleaved(fns, repeats=FLAGS.repeats)
  dense = timings["dense"].median_s
  rows = []
  for name, t in timings.items():
    c = 1.0 if name == "dense" else float(name.split("=")[1])
    flops = 6 * tokens * 2 * num_kept(c, d) * num_kept(c, f)
    rows.append([name, f"{1e3 * t.median_s:.1f}", f"{1e3 * t.min_s:.1f}",
                 f"{dense / t.median_s:.2f}x", f"{flops / 1e9:.1f}",
                 f"{flops / t.median_s / 1e9:.0f}"])
  print(common.markdown_table(
      ["MLP", "median ms", "min ms", "speed-up vs dense", "matmul GFLOP", "GFLOP/s"], rows))


def bench_dtu() -> None:
  import jax
  import jax.numpy as jnp
  from jax import lax
  from stabjax.configs import DTUConfig
  from stabjax.models import dtu
  from benchmarks import common

  b, h, hd = FLAGS.batch, FLAGS.heads, FLAGS.head_dim
  print(f"\n## DTU sampled attention vs dense causal attention, forward+backward: "
        f"batch {b}, {h} heads x {hd}, block_q {FLAGS.block_q}, key-norm scores")
  print(f"# {common.machine_description()}")
  print(f"# dtu.DENSE_BELOW = {dtu.DENSE_BELOW}: auto = dense when n < "
        f"{dtu.DENSE_BELOW} x keep")
  rows = []
  rng = jax.random.key(7)
  for n in [int(s) for s in FLAGS.seq_lens.split(",")]:
    ks = jax.random.split(jax.random.key(n), 4)
    q, k, v = (jax.random.normal(kk, (b, n, h, hd)) for kk in ks[:3])
    cot = jax.random.normal(ks[3], q.shape)
    causal_mask = dtu._candidates(jnp.arange(n), n, None, True)

    def grad_thunk(attn):
      grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attn(q, k, v) * cot), argnums=(0, 1, 2)))
      return lambda: grad(q, k, v)

    fns = {"dense causal": grad_thunk(lambda q, k, v: dtu.full_attention(q, k, v, causal_mask))}
    keeps = []
    for spec in FLAGS.keeps.split(","):
      keep = _keep(spec, n)
      if keep in [kk for _, kk in keeps] or keep >= n:
        continue
      keeps.append((spec.strip(), keep))
      cfg = DTUConfig(enabled=True, keep=keep, block_q=FLAGS.block_q)
      auto = "dense" if n < dtu.DENSE_BELOW * keep else "gathered"
      for impl in ("gathered", "dense"):
        if impl != auto and impl == "dense" and n > FLAGS.max_dense_impl_n:
          continue
        attn = (lambda cfg, impl: lambda q, k, v: dtu.sampled_attention(
            rng, q, k, v, cfg, True, impl=impl)[0])(cfg, impl)
        label = f"keep={keep} ({spec.strip()}) {impl}" + (" [auto]" if impl == auto else "")
        fns[label] = grad_thunk(attn)

      def sample_only(k, cfg=cfg):
        # The gathered path's blockwise sampling (thresholded top-k) alone, forward.
        log_scores = dtu.dtu_log_scores(k, cfg.scores)
        block = min(cfg.block_q, n)
        starts = jnp.arange(-(-n // block)) * block
        one = lambda s: dtu._sample_block(rng, log_scores, s + jnp.arange(block), None, True,
                                          cfg.keep, impl="gathered")[0]
        return lax.map(one, starts)

      jitted = jax.jit(sample_only)
      fns[f"keep={keep} ({spec.strip()}) sample only"] = lambda jitted=jitted: jitted(k)
    timings = common.time_interleaved(fns, repeats=FLAGS.repeats)
    dense = timings["dense causal"].median_s
    for name, t in timings.items():
      rows.append([n, name, f"{1e3 * t.median_s:.1f}", f"{1e3 * t.min_s:.1f}",
                   f"{t.median_s / dense:.2f}"])
    print(common.markdown_table(["n", "attention", "median ms", "min ms", "time / dense"],
                                rows[-len(timings):]), flush=True)
  skipped = [n for n in (int(s) for s in FLAGS.seq_lens.split(",")) if n > FLAGS.max_dense_impl_n]
  if skipped:
    print(f"(for n in {skipped} the 'dense' implementation runs only where auto picks it, "
          f"to bound the run time: it is O(n^2) like the baseline)")


def main(argv):
  del argv
  if FLAGS.unit in ("both", "dmu"):
    bench_dmu()
  if FLAGS.unit in ("both", "dtu"):
    bench_dtu()


if __name__ == "__main__":
  app.run(main)
