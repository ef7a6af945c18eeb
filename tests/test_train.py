"""The BAARA train step: losses, sharding equivalence, abstract compilation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from stabjax import configs
from stabjax import train as train_lib
from stabjax.psu import PSUConfig, find_psu_state
from stabjax.train import RunConfig, SpecialIds, Trainer, make_loss_fn, mlm_corrupt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDS = SpecialIds(pad=0, bos=1, eos=2, mask=3)


def tiny_config(arch="gpt2", psu=True, **train_kw) -> RunConfig:
  model = configs.get_model_config(
      f"{arch}_tiny", vocab_size=64, num_layers=2, d_model=32, d_ff=64, num_heads=4,
      dmu=configs.DMUConfig(enabled=True, c_tilde=0.5),
      dtu=configs.DTUConfig(enabled=True, keep=4))
  train = configs.TrainConfig(**{"batch_size": 8, "seq_len": 16, "steps": 20, "alpha": 0.2,
                                 "warmup_steps": 2, **train_kw})
  return RunConfig(model=model, train=train, psu=PSUConfig(enabled=psu))


def random_batch(seed, cfg: RunConfig):
  rng = np.random.default_rng(seed)
  t = cfg.train
  tokens = rng.integers(4, cfg.model.vocab_size, (t.batch_size, t.seq_len)).astype(np.int32)
  tokens[:, 0] = IDS.bos
  return {"tokens": tokens, "mask": np.ones_like(tokens)}


def test_mlm_corruption_rates():
  tokens = jnp.full((64, 256), 10, jnp.int32).at[:, 0].set(IDS.bos).at[:, 100].set(IDS.eos)
  mask = jnp.ones_like(tokens).at[:, -16:].set(0)
  inputs, selected = mlm_corrupt(jax.random.PRNGKey(0), tokens, mask, IDS, 64, 0.15)
  chex.assert_shape([inputs, selected], tokens.shape)
  sel = np.array(selected)
  assert not sel[:, 0].any() and not sel[:, -16:].any()  # never BOS or padding
  assert 2 <= sel[:, 100].sum() <= 20  # EOS is a target like any word (64 x 0.15 ~ 10)
  n = sel.sum()
  assert abs(n / (64 * 239) - 0.15) < 3 * np.sqrt(0.15 * 0.85 / (64 * 239))
  on_words = sel.copy()
  on_words[:, 100] = False
  inp = np.asarray(inputs)[on_words]
  assert abs(np.mean(inp == IDS.mask) - 0.8) < 0.03
  assert abs(np.mean(inp == 10) - 0.1 - 0.9 / 64 * 0.1) < 0.03  # kept, or random that hit 10
  assert (np.asarray(inputs)[~sel] == np.asarray(tokens)[~sel]).all()


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_step_lowers_loss_and_keeps_state_shapes(arch):
  cfg = tiny_config(arch, lr=1e-2)
  trainer = Trainer.create(cfg, IDS)
  state = trainer.init_state()
  freq = jnp.zeros((cfg.model.vocab_size,), jnp.float32)
  batch = trainer.put_batch(random_batch(0, cfg))
  shapes = jax.tree.map(lambda x: (x.shape, x.dtype), state)
  losses = []
  for _ in range(12):  # the same batch: the loss on it must fall
    state, m = trainer.train_step(state, batch, freq)
    losses.append(float(m["nll"]))
  assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == shapes
  assert int(state.step) == 12
  assert losses[-1] < losses[0] - 0.1, losses
  assert np.isfinite(float(m["psu/gamma"]))


@pytest.mark.parametrize("alpha", [0.0, 0.2])
def test_step_loss_is_numpy_nll_plus_feedback(alpha):
  """Units off, so the training forward is the plain model: the step's nll/loss against a
  NumPy cross-entropy of the next tokens over the real (unpadded) positions."""
  cfg = tiny_config(alpha=alpha, psu=False)
  cfg = RunConfig(model=cfg.model.replace(dmu=configs.DMUConfig(enabled=False),
                                          dtu=configs.DTUConfig(enabled=False)),
                  train=cfg.train, psu=cfg.psu)
  trainer = Trainer.create(cfg, IDS)
  state = trainer.init_state()
  params = jax.device_get(state.params)
  batch = random_batch(1, cfg)
  batch["mask"][:3, -5:] = 0  # padding at the end of three rows
  batch["tokens"][batch["mask"] == 0] = IDS.pad
  _, m = trainer.train_step(state, trainer.put_batch(batch), jnp.zeros((64,), jnp.float32))
  logits = np.asarray(trainer.model.apply({"params": params}, batch["tokens"]), np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  nll = -np.take_along_axis(logp[:, :-1], batch["tokens"][:, 1:, None], -1)[..., 0]
  w = batch["mask"][:, 1:].astype(bool)
  ent = -(np.exp(logp[:, :-1]) * logp[:, :-1]).sum(-1)
  np.testing.assert_allclose(float(m["nll"]), nll[w].mean(), rtol=1e-5)
  np.testing.assert_allclose(float(m["entropy"]), ent[w].mean(), rtol=1e-5)
  np.testing.assert_allclose(float(m["loss"]), nll[w].mean() + alpha / 2 * ent[w].mean() ** 2,
                             rtol=1e-5)


def _dmu_leaves(tree):
  return {f"{k}/{n}": tree[k]["mlp"][n] for k in sorted(tree) if k.startswith("block_")
          for n in ("wi_kernel", "wi_bias", "wo_kernel", "wo_bias")}


def _adam(opt_state):
  return next(s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
              if isinstance(s, optax.ScaleByAdamState))


# dfix (the default) runs by default; the other modes compile a train step each (slow).
@pytest.mark.parametrize("mode", ["dfix"] + [pytest.param(m, marks=pytest.mark.slow)
                                             for m in ("dprob", "dmu2_prob", "dmu2_fix")])
def test_step_changes_only_the_sampled_sub_network(mode):
  """After momentum has built up, one AdamW step (DMU c~ = 0.5) leaves every MLP weight
  outside this step's sub-network, and its Adam moments, exactly as they were. The
  sub-network is found independently of the code under test: the entries whose gradient
  at this step's key is nonzero."""
  cfg = tiny_config(psu=False, lr=1e-2)
  cfg = RunConfig(model=cfg.model.replace(dmu=configs.DMUConfig(enabled=True, c_tilde=0.5,
                                                                mode=mode)),
                  train=cfg.train, psu=cfg.psu)
  trainer = Trainer.create(cfg, IDS)
  state = trainer.init_state()
  freq = jnp.zeros((64,), jnp.float32)
  for i in range(3):
    state, _ = trainer.train_step(state, trainer.put_batch(random_batch(i, cfg)), freq)
  batch = random_batch(7, cfg)
  loss_fn = make_loss_fn(trainer.model, cfg.model, cfg.train, IDS)
  key = jax.random.fold_in(state.key, state.step)
  grads = jax.grad(lambda p: loss_fn(p, batch, key)[0])(jax.device_get(state.params))
  before = jax.device_get(state)
  state, _ = trainer.train_step(state, trainer.put_batch(batch), freq)
  after = jax.device_get(state)
  mu0, mu1 = _adam(before.opt_state).mu, _adam(after.opt_state).mu
  g = _dmu_leaves(grads)
  shares = []
  for name, p0 in _dmu_leaves(before.params).items():
    used = np.asarray(g[name]) != 0
    changed = np.asarray(_dmu_leaves(after.params)[name]) != np.asarray(p0)
    assert not changed[~used].any(), name  # nothing outside the sub-network moved
    assert changed[used].mean() > 0.99, name  # and (almost) everything inside did
    np.testing.assert_array_equal(np.asarray(_dmu_leaves(mu1)[name])[~used],
                                  np.asarray(_dmu_leaves(mu0)[name])[~used])
    shares.append(used.mean())
  # Kernels keep ~c~^2 (node modes) or ~c~ (edge modes) of their entries.
  want = 0.25 if mode in ("dfix", "dprob") else 0.5
  kernels = shares[0::4] + shares[2::4]
  assert abs(np.mean(kernels) - want) < 0.1, shares


def test_step_leaves_groups_outside_the_psu_active_set_unchanged():
  cfg = tiny_config(lr=1e-2, warmup_steps=0)  # (warmup starts at lr 0: no update at step 1)
  cfg = RunConfig(model=cfg.model, train=cfg.train,
                  psu=PSUConfig(init_active_logit=0.0, learn=False, value="exact"))
  trainer = Trainer.create(cfg, IDS)
  state = trainer.init_state()
  freq = jnp.zeros((64,), jnp.float32)
  names = ("block_0", "block_1", "ln_f", "wpe", "wte")  # the group order
  inactive_seen = 0
  for i in range(6):
    before = jax.device_get(state)
    state, _ = trainer.train_step(state, trainer.put_batch(random_batch(i, cfg)), freq)
    after = jax.device_get(state)
    active = np.asarray(find_psu_state(after.opt_state).active)
    for name, on in zip(names, active):
      same = [np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before.params[name]),
                                                    jax.tree.leaves(after.params[name]))]
      same_mu = [np.array_equal(a, b) for a, b in zip(
          jax.tree.leaves(_adam(before.opt_state).mu[name]),
          jax.tree.leaves(_adam(after.opt_state).mu[name]))]
      if on:
        assert not all(same), name
      else:
        inactive_seen += 1
        assert all(same) and all(same_mu), name
  assert inactive_seen > 0


def test_ablation_variants_can_share_the_full_models_psu_c_tilde():
  full = tiny_config()
  nodmu = RunConfig(model=full.model.replace(dmu=configs.DMUConfig(enabled=False, c_tilde=0.5)),
                    train=full.train, psu=full.psu)
  shared = RunConfig(model=nodmu.model, train=full.train, psu=PSUConfig(c_tilde_from="full"))
  c = {name: Trainer.create(cfg, IDS).c_tilde for name, cfg in
       (("full", full), ("nodmu", nodmu), ("shared", shared))}
  assert c["shared"] == c["full"] < c["nodmu"], c


SHARDED_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    sys.path.insert(0, {tests!r})
    from test_train import tiny_config, random_batch, IDS
    from stabjax import sharding
    from stabjax.train import Trainer
    import jax.numpy as jnp
    cfg = tiny_config()
    out = {{}}
    for name, mesh in [("one", sharding.make_mesh("data=1,fsdp=1,tensor=1", jax.devices()[:1])),
                       ("eight", sharding.make_mesh("data=2,fsdp=4,tensor=1"))]:
      trainer = Trainer.create(cfg, IDS, mesh=mesh)
      state = trainer.init_state()
      freq = jax.device_put(jnp.zeros((64,), jnp.float32), sharding.replicated(mesh))
      losses = []
      for i in range(3):
        state, m = trainer.train_step(state, trainer.put_batch(random_batch(i, cfg)), freq)
        losses.append(float(m["loss"]))
      params = jax.tree.map(np.asarray, jax.device_get(state.params))
      np.savez(f"{{sys.argv[1]}}/{{name}}.npz",
               **{{jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(params)}})
      wte = state.params["wte"]
      kernel = state.params["block_0"]["mlp"]["wi_kernel"]
      out[name] = {{"losses": losses, "devices": len(jax.devices()),
                    "wte_spec": str(wte.sharding.spec),
                    "wte_shard_shape": list(wte.sharding.shard_shape(wte.shape)),
                    "kernel_replicated": kernel.sharding.is_fully_replicated}}
    print(json.dumps(out))
""")


def test_sharded_step_equals_single_device(tmp_path):
  """8 simulated CPU devices, mesh data=2,fsdp=4: same losses and parameters as 1 device."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  script = SHARDED_SCRIPT.format(tests=os.path.join(REPO, "tests"))
  proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["eight"]["devices"] == 8
  np.testing.assert_allclose(out["eight"]["losses"], out["one"]["losses"], rtol=2e-5)
  # Parameters really are sharded: the embedding's model dim over fsdp (32 / 4 = 8).
  assert "fsdp" in out["eight"]["wte_spec"]
  assert out["eight"]["wte_shard_shape"] == [64, 8]
  assert not out["eight"]["kernel_replicated"]
  one, eight = np.load(tmp_path / "one.npz"), np.load(tmp_path / "eight.npz")
  assert set(one.files) == set(eight.files)
  for k in one.files:
    np.testing.assert_allclose(eight[k], one[k], rtol=1e-4, atol=1e-5, err_msg=k)


@pytest.mark.slow
def test_gpt2_1b_step_compiles_on_8_devices_from_abstract_shapes():
  env = dict(os.environ, PYTHONPATH=REPO)
  proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "memory.py"),
                         "--devices=8", "--models=gpt2_1b", "--seq_len=512"],
                        env=env, capture_output=True, text=True, timeout=1800)
  assert proc.returncode == 0, proc.stderr[-3000:]
  row = [l for l in proc.stdout.splitlines() if l.startswith("| gpt2_1b")][0]
  args_gib = float(row.split("|")[6])
  # 1.0e9 params x (param + 2 Adam moments) x 4 bytes / 8 devices ~ 1.5 GiB per device.
  assert 1.0 < args_gib < 2.5, row


@pytest.mark.parametrize("form", ["zero", "data"])
def test_traced_alpha_zero_is_plain_mle_bit_for_bit(form):
  """alpha is a traced argument of the step, so at alpha = 0 the feedback term is still in
  the program, multiplied by zero. Three steps (units and PSU on) must equal, bit for bit,
  those of the program with no term at all (psu_only: loss = nll)."""
  runs = {}
  for f in (form, "psu_only"):
    kw = {"feedback_target": 1.5} if f == "data" else {}
    cfg = tiny_config(alpha=0.0, feedback=f, **kw)
    trainer = Trainer.create(cfg, IDS)
    state = trainer.init_state()
    freq = jnp.linspace(0.0, 3.0, cfg.model.vocab_size)
    for i in range(3):
      state, m = trainer.train_step(state, trainer.put_batch(random_batch(i, cfg)), freq)
    runs[f] = jax.device_get((state.params, state.opt_state, m["nll"], m["grad_norm"]))
  for a, b in zip(jax.tree.leaves(runs[form]), jax.tree.leaves(runs["psu_only"])):
    np.testing.assert_array_equal(a, b)


def test_runs_that_differ_only_in_scalars_lower_to_one_program():
  """alpha, H_data, the schedule, AdamW's scalars and the seed are arguments, not
  constants: two such configs lower the train and eval steps to the same text (so the
  persistent compilation cache compiles a sweep's shape once), and each still trains with
  its own values."""
  a = tiny_config(alpha=0.05, feedback="data", feedback_target=1.0, seed=0)
  b = tiny_config(alpha=0.2, feedback="data", feedback_target=2.5, seed=7, lr=1e-2, steps=40,
                  warmup_steps=5, min_lr_ratio=0.3, weight_decay=0.1, clip_norm=0.5, b1=0.8,
                  b2=0.99, feedback_ema_decay=0.5)
  ta = Trainer.create(a, IDS)
  train_lib._jitted.cache_clear()  # tb traces its own functions: the texts are compared
  tb = Trainer.create(b, IDS)
  assert ta.jit_train_step is not tb.jit_train_step
  assert ta.lower_train_step().as_text() == tb.lower_train_step().as_text()
  ev = lambda t: t.eval_step.__wrapped__.lower(  # noqa: E731
      t.abstract_state.params, {k: jax.ShapeDtypeStruct((8, 16), jnp.int32)
                                for k in ("tokens", "mask")},
      jax.ShapeDtypeStruct((2,), jnp.uint32)).as_text()
  assert ev(ta) == ev(tb)
  # A changed shape is a new program (the comparison above can fail).
  tc = Trainer.create(tiny_config(alpha=0.05, feedback="data", feedback_target=1.0,
                                  batch_size=4), IDS)
  assert tc.lower_train_step().as_text() != ta.lower_train_step().as_text()
  # The values reach the step: the seed the init, alpha and H_data the loss.
  sa, sb = ta.init_state(), tb.init_state()
  assert not np.array_equal(jax.device_get(sa.params["wpe"]), jax.device_get(sb.params["wpe"]))
  batch = random_batch(0, a)
  freq = jnp.zeros((a.model.vocab_size,), jnp.float32)
  _, ma = ta.train_step(sa, ta.put_batch(batch), freq)
  _, mb = tb.train_step(sb, tb.put_batch(batch), freq)
  for m, alpha, target in ((ma, 0.05, 1.0), (mb, 0.2, 2.5)):
    np.testing.assert_allclose(float(m["loss"]), float(m["nll"]) + alpha / 2
                               * (float(m["entropy"]) - target) ** 2, rtol=1e-5)


def test_trainers_of_one_shape_share_the_jitted_step_and_train_with_their_own_values():
  """A sweep's later run reuses the process's jitted init and train step (no new trace) and
  trains exactly as it would alone: nothing of the first run's alpha, schedule or seed is
  baked into the shared functions; a changed static setting gets functions of its own."""
  b = tiny_config(alpha=0.2, seed=7, lr=1e-2, warmup_steps=5, clip_norm=0.5)
  batches = [random_batch(i, b) for i in range(3)]
  freq = jnp.linspace(0.0, 3.0, b.model.vocab_size, dtype=jnp.float32)

  def run(trainer):
    state = trainer.init_state()
    for batch in batches:
      state, metrics = trainer.train_step(state, trainer.put_batch(batch), freq)
    return jax.device_get((state.params, state.opt_state, metrics))

  train_lib._jitted.cache_clear()
  alone = run(Trainer.create(b, IDS))
  train_lib._jitted.cache_clear()
  first = Trainer.create(tiny_config(alpha=0.0, seed=1), IDS)
  run(first)
  second = Trainer.create(b, IDS)
  assert second.jit_train_step is first.jit_train_step
  shared = run(second)
  assert first.jit_train_step._cache_size() == 1  # traced once, for both runs
  chex.assert_trees_all_equal(shared, alone)
  ema = Trainer.create(tiny_config(alpha=0.2, feedback="ema"), IDS)
  assert ema.jit_train_step is not first.jit_train_step
