r"""Per-device memory of the compiled train step for the paper's large models.

Lowers and compiles the full BAARA step (DMU, DTU, feedback, PSU exact) from abstract
shapes only (no parameter is allocated) on a simulated CPU mesh and prints what XLA
reports per device. On CPU the numbers are XLA's buffer assignment for the CPU backend:
a faithful count of arguments (sharded params + optimizer state) and a rough one of
temporaries (GPU/TPU fusion differs).

  python benchmarks/memory.py --devices=8 --models=gpt2_1b,gpt2_2b,gpt2_3b
  python benchmarks/memory.py --devices=32 --remat=both
"""

from __future__ import annotations

import os
import sys


def _set_devices(argv) -> None:
  n = next((a.split("=", 1)[1] for a in argv if a.startswith("--devices=")), "8")
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={n}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")


_set_devices(sys.argv)

import time  # noqa: E402

from absl import app, flags  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

flags.DEFINE_integer("devices", 8, "Simulated devices (set before jax starts).")
flags.DEFINE_string("models", "gpt2_1b,gpt2_2b,gpt2_3b", "Comma-separated model names.")
flags.DEFINE_string("mesh", "data=1,fsdp=-1,tensor=1", "Mesh over the devices.")
flags.DEFINE_integer("batch_size", 8, "Global batch.")
flags.DEFINE_integer("seq_len", 1024, "Sequence length.")
flags.DEFINE_enum("remat", "on", ["on", "off", "both"], "Block rematerialisation.")
flags.DEFINE_string("dtype", "bfloat16", "Compute dtype.")
FLAGS = flags.FLAGS

GiB = 2**30


def measure(name: str, remat: bool) -> dict:
  import jax
  from stabjax import configs
  from stabjax.train import RunConfig, SpecialIds, Trainer

  model = configs.get_model_config(
      name, dtype=FLAGS.dtype, remat=remat, scan_layers=True,
      dmu=configs.DMUConfig(enabled=True), dtu=configs.DTUConfig(enabled=True, keep=256))
  train = configs.TrainConfig(batch_size=FLAGS.batch_size, seq_len=FLAGS.seq_len,
                              mesh=FLAGS.mesh, alpha=0.2)
  cfg = RunConfig(model=model, train=train)
  t0 = time.perf_counter()
  trainer = Trainer.create(cfg, SpecialIds(pad=0, bos=1, eos=2, mask=3))
  compiled = trainer.lower_train_step().compile()
  mem = compiled.memory_analysis()
  from stabjax.models import count_params
  return {
      "model": name, "params": count_params(model), "devices": jax.device_count(),
      "mesh": dict(trainer.mesh.shape), "remat": remat,
      "argument_gib": mem.argument_size_in_bytes / GiB,
      "output_gib": mem.output_size_in_bytes / GiB,
      "temp_gib": mem.temp_size_in_bytes / GiB,
      "alias_gib": mem.alias_size_in_bytes / GiB,
      "compile_s": time.perf_counter() - t0,
  }


def main(_):
  remats = {"on": [True], "off": [False], "both": [True, False]}[FLAGS.remat]
  print(f"| model | params | devices | mesh | remat | args GiB/dev | temp GiB/dev | "
        f"compile s |\n|---|---|---|---|---|---|---|---|")
  for name in FLAGS.models.split(","):
    for remat in remats:
      r = measure(name, remat)
      mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items())
      print(f"| {r['model']} | {r['params'] / 1e9:.2f}B | {r['devices']} | {mesh} | "
            f"{r['remat']} | {r['argument_gib']:.2f} | {r['temp_gib']:.2f} | "
            f"{r['compile_s']:.0f} |", flush=True)


if __name__ == "__main__":
  app.run(main)
