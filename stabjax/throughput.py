"""Model FLOPs per token and device peaks: tokens/s and MFU of a training run (SPEC 7).

Model FLOPs per token, the PaLM-style formula:

  6 N + 12 L d T

N counts every parameter except the position embeddings (a table lookup, no matmul);
the token embedding is counted once, since the tied output projection is a d x V
matmul. 12 L d T is the attention's score (QK^T) and value (PV) matmuls, forward and
backward, with T = seq_len and *no causal halving*. The same dense-model FLOPs are used
whatever the DMU/DTU skip, so with the units on MFU is an effective rate.
"""

from __future__ import annotations

import math

import jax

# Dense (no structured sparsity) peak TFLOP/s per chip, bf16 (SPEC 7's table). The CPU
# has no entry: its peak is unknown, so no MFU is reported there.
PEAK_TFLOPS: dict[str, float] = {
    "H100": 989.0,
    "H200": 989.0,
    "A100": 312.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,  # v5e reports itself as "TPU v5 lite"
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v5": 459.0,  # v5p reports itself as "TPU v5"
    "TPU v6 lite": 918.0,  # v6e (Trillium)
    "TPU v6e": 918.0,
}


def peak_tflops(device: jax.Device | None = None) -> float | None:
  """The dense bf16 peak of `device` from `PEAK_TFLOPS`, or None when unknown (CPU)."""
  device = jax.devices()[0] if device is None else device
  if device.platform == "cpu":
    return None
  kind = device.device_kind
  # Longest key first, so "TPU v5 lite" wins over "TPU v5".
  for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
    if key.lower() in kind.lower():
      return PEAK_TFLOPS[key]
  return None


def model_flops_per_token(model_cfg, seq_len: int) -> tuple[float, int]:
  """(6 N + 12 L d T, N) of `model_cfg` at `seq_len`; N excludes position embeddings."""
  from stabjax.models import init_params
  shapes = jax.eval_shape(lambda k: init_params(model_cfg, k), jax.random.key(0))
  n = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(shapes):
    names = [str(getattr(p, "key", p)) for p in path]
    if "wpe" in names or "position" in names:
      continue
    n += math.prod(leaf.shape)
  attention = 12 * model_cfg.num_layers * model_cfg.d_model * seq_len
  return 6.0 * n + attention, n


def step_throughput(tokens: int, seconds: float, flops_per_token: float,
                    num_devices: int, peak: float | None) -> dict[str, float]:
  """{'perf/tokens_per_s_per_device', 'perf/mfu' (only with a known peak)} of one step."""
  per_device = tokens / max(seconds, 1e-9) / num_devices
  out = {"perf/tokens_per_s_per_device": per_device}
  if peak:
    out["perf/mfu"] = per_device * flops_per_token / (peak * 1e12)
  return out
