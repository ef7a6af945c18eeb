"""DMU, the Dynamic MLP Unit (SPEC section 3, paper appendix B.3, Alg. 2-4).

The unit is the block's two-layer MLP, y = act(x @ wi + bi) @ wo + bo, trained under a
random retention mask drawn from the `'dmu'` RNG stream on every training call. Three
node sets take part: the d input features, the d_ff hidden units (shared by both
layers: layer 1's output nodes are layer 2's input nodes) and the d output features.

Modes (`DMUConfig.mode`), with c~ = `DMUConfig.c_tilde`:

* `dmu2_prob` (Alg. 2, Prob): every entry of wi, bi, wo, bo kept i.i.d. Bernoulli(c~).
* `dmu2_fix` (Alg. 2, Fix): exactly k = floor(c~ N) entries of each N-entry tensor kept,
  a uniform subset.
* `dprob` (Alg. 4): input, hidden and output nodes kept i.i.d. Bernoulli(c~).
* `dfix` (Alg. 3, default): exactly floor(c~ d) input, floor(c~ d_ff) hidden and
  floor(c~ d) output nodes, uniform subsets shared by the whole batch. The kept
  rows/columns are gathered so both matmuls shrink (compute ~ c~^2, SPEC 3) and the
  output is scattered back to d features, zeros elsewhere.

A dropped node contributes nothing: a dropped input feature is zeroed, a dropped hidden
unit's activation is zeroed (so its bias and both its weight rows/columns are unused),
a dropped output feature is zeroed (so is its bias). Masked parameters take no part in
the forward pass, hence get exactly zero gradient that step (the active subspace of
eq. 69); `dmu_param_masks` names them.

Scaling (SPEC 3). Let p be the keep probability of one masked quantity (`keep_probs`:
c~ for the Bernoulli modes, k/N exactly for the fixed modes):

* `rescale=False` (default, the paper's): no rescale in training, so the expected
  update is p * gradient (eq. 79). At evaluation (`deterministic=True`) every masked
  quantity is replaced by its expectation factor ("weight scaling"): edge modes use
  x @ (p_W wi) + p_b bi and h @ (p_W wo) + p_b bo, i.e. c~(Wx + b) per linear map
  (eq. 117); node modes multiply the input x by p_in, the hidden activation by p_h and
  the output by p_out. For the linear maps this is the exact expectation of the masked
  map; through the nonlinearity it is the usual dropout approximation.
* `rescale=True`: inverted scaling, every kept quantity divided by p in training,
  identity at evaluation.

`enabled=False` or c~ = 1 is exactly the standard MLP (the same code path).

The 'dmu_masks' collection (what a training step needs to confine its update to the
step's sub-network, SPEC 6). On a masked training call with the collection mutable
(`model.apply(..., mutable=['dmu_masks'])`) the unit stores the masks it used, bool:
node modes `input` [d], `hidden` [d_ff], `output` [d]; edge modes `wi_kernel`,
`wi_bias`, `wo_kernel`, `wo_bias` (param-shaped). Passed back in
(`{'params': ..., 'dmu_masks': ...}`) they are used instead of drawing from the
`'dmu'` stream: the frozen-set pass (the same masks as the same key draws, but without
depending on it). `touched_params` turns the collection into a params-shaped tree of
which entries the call could change.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Callable

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import FrozenDict

from stabjax.configs import DMUConfig

ACTIVATIONS = {
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),  # GPT-2 ("gelu_new")
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # BERT
}

EDGE_MODES = ("dmu2_prob", "dmu2_fix")
NODE_MODES = ("dprob", "dfix")
PARAM_NAMES = ("wi_kernel", "wi_bias", "wo_kernel", "wo_bias")
NODE_NAMES = ("input", "hidden", "output")

Params = dict[str, jax.Array]
Masks = dict[str, jax.Array]


def num_kept(c_tilde: float, n: int) -> int:
  """floor(c~ n), the size of a fixed-mode subset (Alg. 2 Fix, Alg. 3), at least 1.

  A small tolerance keeps e.g. 0.29 * 100 (= 28.999...96 in floating point) at 29; the
  lower bound 1 keeps the unit from vanishing (and the scalings finite) for tiny c~.
  """
  return max(1, min(n, math.floor(c_tilde * n + 1e-9)))


def keep_probs(config: DMUConfig, d: int, d_ff: int) -> dict[str, float]:
  """The probability that one entry (edge modes) or node (node modes) is kept.

  Edge modes: keys `PARAM_NAMES`; node modes: keys `NODE_NAMES`.
  """
  c = config.c_tilde
  if config.mode == "dmu2_prob":
    return {name: c for name in PARAM_NAMES}
  if config.mode == "dmu2_fix":
    sizes = {"wi_kernel": d * d_ff, "wi_bias": d_ff, "wo_kernel": d_ff * d, "wo_bias": d}
    return {name: num_kept(c, n) / n for name, n in sizes.items()}
  if config.mode == "dprob":
    return {name: c for name in NODE_NAMES}
  sizes = {"input": d, "hidden": d_ff, "output": d}
  return {name: num_kept(c, n) / n for name, n in sizes.items()}


def dmu_scales(config: DMUConfig, d: int, d_ff: int, deterministic: bool) -> dict[str, float]:
  """Multipliers applied to the masked quantities (see the module docstring).

  Training: 1 (paper) or 1/p (`rescale`); evaluation: p (paper) or 1 (`rescale`).
  """
  probs = keep_probs(config, d, d_ff)
  if deterministic:
    return {k: (1.0 if config.rescale else p) for k, p in probs.items()}
  return {k: (1.0 / p if config.rescale else 1.0) for k, p in probs.items()}


def _subset_mask(key: jax.Array, n: int, k: int) -> jax.Array:
  """bool [n] with exactly k True entries, a uniform k-subset."""
  return jax.random.permutation(key, n) < k


def _subset_indices(key: jax.Array, n: int, k: int) -> jax.Array:
  """int32 [k]: a uniform k-subset of range(n), sorted (contiguous-ish gathers)."""
  return jnp.sort(jax.random.permutation(key, n)[:k]).astype(jnp.int32)


def dmu_masks(key: jax.Array, config: DMUConfig, d: int, d_ff: int) -> Masks:
  """Draws the masks of one training call (Alg. 2-4).

  Returns bool masks, True = kept:
    edge modes: `wi_kernel` [d, d_ff], `wi_bias` [d_ff], `wo_kernel` [d_ff, d],
      `wo_bias` [d];
    node modes: `input` [d], `hidden` [d_ff], `output` [d]; `dfix` also gives the kept
      node indices `input_idx`, `hidden_idx`, `output_idx` (sorted int32, static sizes
      floor(c~ d), floor(c~ d_ff), floor(c~ d)).
  """
  c = config.c_tilde
  k_wi, k_bi, k_wo, k_bo = jax.random.split(key, 4)
  if config.mode == "dmu2_prob":
    return {
        "wi_kernel": jax.random.bernoulli(k_wi, c, (d, d_ff)),
        "wi_bias": jax.random.bernoulli(k_bi, c, (d_ff,)),
        "wo_kernel": jax.random.bernoulli(k_wo, c, (d_ff, d)),
        "wo_bias": jax.random.bernoulli(k_bo, c, (d,)),
    }
  if config.mode == "dmu2_fix":
    return {
        "wi_kernel": _subset_mask(k_wi, d * d_ff, num_kept(c, d * d_ff)).reshape(d, d_ff),
        "wi_bias": _subset_mask(k_bi, d_ff, num_kept(c, d_ff)),
        "wo_kernel": _subset_mask(k_wo, d_ff * d, num_kept(c, d_ff * d)).reshape(d_ff, d),
        "wo_bias": _subset_mask(k_bo, d, num_kept(c, d)),
    }
  sizes = {"input": d, "hidden": d_ff, "output": d}
  keys = {"input": k_wi, "hidden": k_bi, "output": k_wo}
  if config.mode == "dprob":
    return {name: jax.random.bernoulli(keys[name], c, (n,)) for name, n in sizes.items()}
  masks = {}
  for name, n in sizes.items():
    idx = _subset_indices(keys[name], n, num_kept(c, n))
    masks[name + "_idx"] = idx
    masks[name] = jnp.zeros((n,), bool).at[idx].set(True)
  return masks


def dmu_param_masks(masks: Masks) -> Masks:
  """Which parameter entries take part in the forward pass under `masks` (bool).

  Edge modes: the masks themselves. Node modes (Alg. 3/4, M_W and M_b): a kernel entry
  is used iff both its nodes are kept, a bias entry iff its output node is kept.
  Every other entry gets exactly zero gradient. Leading axes (e.g. the layer axis of
  scanned blocks) are carried through.
  """
  if "wi_kernel" in masks:
    return {name: masks[name] for name in PARAM_NAMES}
  m_in, m_h, m_out = masks["input"], masks["hidden"], masks["output"]
  return {
      "wi_kernel": m_in[..., :, None] & m_h[..., None, :],
      "wi_bias": m_h,
      "wo_kernel": m_h[..., :, None] & m_out[..., None, :],
      "wo_bias": m_out,
  }


def _is_unit_masks(tree: Any) -> bool:
  """Whether a 'dmu_masks' subtree is the stored masks of one DMU."""
  return isinstance(tree, Mapping) and ("wi_kernel" in tree or "input" in tree)


def touched_params(params: Any, dmu_masks: Any) -> Any:
  """Which parameter entries a training call could change, a tree shaped like params.

  `params` is the model's full (unboxed) params tree, `dmu_masks` the 'dmu_masks'
  collection that call returned (`model.apply(..., mutable=['dmu_masks', ...])`; empty
  or None when the DMU was off, c~ = 1 or the call deterministic). Leaves:

  * a DMU's `wi_kernel`, `wi_bias`, `wo_kernel`, `wo_bias`: bool arrays of the param's
    full shape (`dmu_param_masks` of the stored masks; with a leading layer axis for
    scanned blocks). False entries took no part in the call: zero gradient.
  * every other parameter (and every DMU param without stored masks): the Python bool
    True, so a caller can skip it with `leaf is True`.

  Pure; inside jit the True leaves are trace-time constants (returned from a jitted
  function they become bool arrays).
  """
  def walk(p, m):
    if not isinstance(p, Mapping):
      return True
    if _is_unit_masks(m):
      used = dmu_param_masks(m)
      out = {}
      for name, leaf in p.items():
        if name in used:
          if tuple(used[name].shape) != tuple(np.shape(leaf)):
            raise ValueError(f"dmu mask {name} has shape {used[name].shape}, the param "
                             f"{np.shape(leaf)}")
          out[name] = used[name]
        else:
          out[name] = walk(leaf, None)
    else:
      m = m if isinstance(m, Mapping) else {}
      out = {name: walk(leaf, m.get(name)) for name, leaf in p.items()}
    return FrozenDict(out) if isinstance(p, FrozenDict) else out

  return walk(params, dmu_masks)


def _scale(a: jax.Array, s: float) -> jax.Array:
  # Skipping the multiply by 1 keeps the unscaled paths bitwise equal to the plain MLP.
  return a if s == 1.0 else a * jnp.asarray(s, a.dtype)


def _keep(a: jax.Array, m: jax.Array) -> jax.Array:
  return jnp.where(m, a, jnp.zeros((), a.dtype))


def mlp(params: Params, x: jax.Array, activation: Callable[[jax.Array], jax.Array]) -> jax.Array:
  """The standard MLP act(x @ wi + bi) @ wo + bo."""
  h = activation(x @ params["wi_kernel"] + params["wi_bias"])
  return h @ params["wo_kernel"] + params["wo_bias"]


def dmu_dense_reference(params: Params, x: jax.Array, masks: Masks | None,
                        scales: dict[str, float],
                        activation: Callable[[jax.Array], jax.Array]) -> jax.Array:
  """The DMU as a masked dense computation, for any mode (and the eval scaling).

  `scales` (from `dmu_scales`) names the mode's masked quantities. Edge modes (keys
  `PARAM_NAMES`): each linear map is s_W (x @ (M_W * W)) + s_b (M_b * b). Node modes
  (keys `NODE_NAMES`, Alg. 3/4 per layer): x -> s_in M_in x, h -> s_h M_h act(.),
  y -> s_out M_out (.). `masks=None`: all kept, scales only (the evaluation rule).
  """
  if masks is None:
    keep = lambda a, name: a
  else:
    keep = lambda a, name: _keep(a, masks[name])
  if "wi_kernel" in scales:
    p = {n: keep(params[n], n) for n in PARAM_NAMES}
    u = _scale(x @ p["wi_kernel"], scales["wi_kernel"]) + _scale(p["wi_bias"], scales["wi_bias"])
    h = activation(u)
    return _scale(h @ p["wo_kernel"], scales["wo_kernel"]) + _scale(p["wo_bias"], scales["wo_bias"])
  xs = _scale(keep(x, "input"), scales["input"])
  h = activation(xs @ params["wi_kernel"] + params["wi_bias"])
  h = _scale(keep(h, "hidden"), scales["hidden"])
  y = h @ params["wo_kernel"] + params["wo_bias"]
  return _scale(keep(y, "output"), scales["output"])


def dmu_gathered(params: Params, x: jax.Array, masks: Masks, scales: dict[str, float],
                 activation: Callable[[jax.Array], jax.Array]) -> jax.Array:
  """`dfix` with the kept nodes gathered: two matmuls of c~ d x c~ d_ff (SPEC 3).

  Equal to `dmu_dense_reference` with the same masks; dropped output features are 0.
  """
  d = x.shape[-1]
  i_in, i_h, i_out = masks["input_idx"], masks["hidden_idx"], masks["output_idx"]
  take = lambda a, idx, axis: jnp.take(a, idx, axis=axis, mode="clip",
                                       unique_indices=True, indices_are_sorted=True)
  wi = take(take(params["wi_kernel"], i_in, 0), i_h, 1)
  wo = take(take(params["wo_kernel"], i_h, 0), i_out, 1)
  xs = _scale(take(x, i_in, -1), scales["input"])
  h = _scale(activation(xs @ wi + take(params["wi_bias"], i_h, 0)), scales["hidden"])
  ys = _scale(h @ wo + take(params["wo_bias"], i_out, 0), scales["output"])
  y = jnp.zeros(x.shape[:-1] + (d,), ys.dtype)
  return y.at[..., i_out].set(ys, mode="promise_in_bounds", unique_indices=True,
                              indices_are_sorted=True)


class DMU(nn.Module):
  """x [..., d_model] -> [..., d_model]: x @ wi + bi -> act -> @ wo + bo, with masks.

  Masks are drawn from the `'dmu'` RNG stream when `config.enabled` and not
  `deterministic`, or taken from the 'dmu_masks' collection when it holds them, and
  stored there when it is mutable; see the module docstring.
  """

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
    params = {"wi_kernel": cast(wi_kernel), "wi_bias": cast(wi_bias),
              "wo_kernel": cast(wo_kernel), "wo_bias": cast(wo_bias)}
    x = cast(x)
    cfg = self.config
    if not cfg.enabled or cfg.c_tilde == 1.0:
      y = mlp(params, x, act)
    else:
      scales = dmu_scales(cfg, d, self.d_ff, deterministic)
      if deterministic:
        y = dmu_dense_reference(params, x, None, scales, act)
      else:
        masks = self._masks(d)
        if cfg.mode == "dfix":
          y = dmu_gathered(params, x, masks, scales, act)
        else:
          y = dmu_dense_reference(params, x, masks, scales, act)
    chex.assert_equal_shape([x, y])
    return y

  def _masks(self, d: int) -> Masks:
    """This call's masks: the stored ones (frozen-set pass) or a draw; stored if mutable."""
    cfg = self.config
    names = NODE_NAMES if cfg.mode in NODE_MODES else PARAM_NAMES
    if self.has_variable("dmu_masks", names[0]):
      masks = {name: self.get_variable("dmu_masks", name) for name in names}
      if cfg.mode == "dfix":  # the gather indices, sorted as `dmu_masks` draws them
        sizes = {"input": d, "hidden": self.d_ff, "output": d}
        for name, n in sizes.items():
          masks[name + "_idx"] = jnp.nonzero(masks[name], size=num_kept(cfg.c_tilde, n),
                                             fill_value=0)[0].astype(jnp.int32)
    else:
      masks = dmu_masks(self.make_rng("dmu"), cfg, d, self.d_ff)
    if self.is_mutable_collection("dmu_masks"):
      for name in names:
        self.put_variable("dmu_masks", name, masks[name])
    return masks
