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
import pytest

from stabjax import configs
from stabjax.psu import PSUConfig
from stabjax.train import RunConfig, SpecialIds, Trainer, mlm_corrupt

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
  tokens = jnp.full((64, 256), 10, jnp.int32).at[:, 0].set(IDS.bos)
  mask = jnp.ones_like(tokens).at[:, -16:].set(0)
  inputs, selected = mlm_corrupt(jax.random.PRNGKey(0), tokens, mask, IDS, 64, 0.15)
  chex.assert_shape([inputs, selected], tokens.shape)
  sel = np.asarray(selected)
  assert not sel[:, 0].any() and not sel[:, -16:].any()  # never BOS or padding
  n = sel.sum()
  assert abs(n / (64 * 239) - 0.15) < 3 * np.sqrt(0.15 * 0.85 / (64 * 239))
  inp = np.asarray(inputs)[sel]
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


def test_feedback_off_at_alpha_zero_gives_plain_nll():
  cfg = tiny_config(alpha=0.0, psu=False)
  trainer = Trainer.create(cfg, IDS)
  state = trainer.init_state()
  _, m = trainer.train_step(state, trainer.put_batch(random_batch(1, cfg)),
                            jnp.zeros((64,), jnp.float32))
  assert float(m["loss"]) == float(m["nll"])


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
