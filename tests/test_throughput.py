"""stabjax.throughput: model FLOPs per token and MFU, against a hand count."""

from __future__ import annotations

import pytest

from stabjax import configs, throughput


def test_flops_per_token_is_6n_plus_attention_with_n_counted_by_hand():
  d, layers, vocab, t = 32, 2, 100, 16
  cfg = configs.get_model_config("gpt2_tiny", vocab_size=vocab, num_layers=layers, d_model=d,
                                 d_ff=4 * d, num_heads=4, max_len=64)
  block = (2 * 2 * d                      # two layer norms (scale, bias)
           + d * 3 * d + 3 * d            # qkv
           + d * d + d                    # attention output
           + d * 4 * d + 4 * d + 4 * d * d + d)  # MLP
  n = vocab * d + layers * block + 2 * d  # tied embedding, blocks, final layer norm
  flops, counted = throughput.model_flops_per_token(cfg, t)
  assert counted == n
  assert flops == 6 * n + 12 * layers * d * t


def test_step_throughput_per_device_and_mfu_only_with_a_known_peak():
  out = throughput.step_throughput(tokens=4096, seconds=0.5, flops_per_token=1e9,
                                   num_devices=4, peak=100.0)
  assert out["perf/tokens_per_s_per_device"] == pytest.approx(2048.0)
  assert out["perf/mfu"] == pytest.approx(2048.0 * 1e9 / 100e12)
  assert "perf/mfu" not in throughput.step_throughput(4096, 0.5, 1e9, 4, None)
