"""DMU, the Dynamic MLP Unit (SPEC section 3, paper appendix B.3, Alg. 2-4).

SKELETON: only the switched-off path (a standard two-layer GELU MLP) is here; the
stochastic modes are being written. Parameter names and logical axes are final.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from stabjax.configs import DMUConfig

ACTIVATIONS = {
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),  # GPT-2 ("gelu_new")
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # BERT
}


class DMU(nn.Module):
  """x [..., d_model] -> [..., d_model]: x @ wi + bi -> act -> @ wo + bo, with masks."""

  d_ff: int
  config: DMUConfig = DMUConfig(enabled=False)
  activation: str = "gelu_tanh"
  dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.normal(stddev=0.02)

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    d = x.shape[-1]
    p = lambda name, init, shape, axes: self.param(
        name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)
    wi_kernel = p("wi_kernel", self.kernel_init, (d, self.d_ff), ("embed", "mlp"))
    wi_bias = p("wi_bias", nn.initializers.zeros, (self.d_ff,), ("mlp",))
    wo_kernel = p("wo_kernel", self.kernel_init, (self.d_ff, d), ("mlp", "embed"))
    wo_bias = p("wo_bias", nn.initializers.zeros, (d,), ("embed",))
    act = ACTIVATIONS[self.activation]
    cast = lambda a: jnp.asarray(a, self.dtype)
    h = act(cast(x) @ cast(wi_kernel) + cast(wi_bias))
    return h @ cast(wo_kernel) + cast(wo_bias)
