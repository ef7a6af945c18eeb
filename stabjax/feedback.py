"""The feedback loop on the predictive entropy and the batch statistics (SPEC 5, 6).

The paper closes a first-order negative feedback loop (section 6.1, eq. 61)

    x_{t+1} = x_t - alpha * f(x_t) + eta_t,

but names neither the statistic x_t nor the loss that realises it. SPEC 5 reads x_t as
the batch's mean next-token predictive entropy H(B_t) (eq. 67) and f(x) = x - x*, and
realises the loop with the loss term

    L_fb = (alpha / 2) * (H(B_t) - x*)^2,

whose gradient step gives x_{t+1} ~= x_t - alpha * lr * |grad H|^2 * (x_t - x*). This is
an interpretation, not the paper's text. With x* = 0 the term also asks for lower
entropy, a confound of "stabilisation"; `configs.FEEDBACK_FORMS` therefore makes the
setpoint an experiment axis (0, a running average of H, the data's entropy, or no term).

This module also holds the per-batch statistics the PSU reads (SPEC 6, appendix A):
global gradient norm (for the learning accuracy a~, eq. 62), the diagonal Fisher per
parameter group, token rarity and the analytic learning complexity c~ (eq. 63).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from stabjax.configs import ModelConfig

PyTree = Any

# The top-level key of stacked (nn.scan) blocks: each slice of its leading axis is a group.
SCANNED_KEY = "layers"


# ----------------------------------------------------------------------------------------
# Parameter groups.


def _natural_key(name: str):
  """'block_2' sorts before 'block_10'."""
  return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name)]


def param_groups(params: PyTree) -> tuple[PyTree, int, tuple[str, ...]]:
  """Assigns every parameter to a group: one group per top-level layer (SPEC 6).

  Args:
    params: the model's parameter dict (arrays or `jax.ShapeDtypeStruct`s), top-level
      keys such as 'wte', 'block_0', ..., 'ln_f'. Under the key 'layers' (scanned
      blocks) every slice of the leading axis is its own group. A dict holding only
      'params' is looked into.

  Returns:
    groups: a tree with the structure of `params` whose leaves are int32 arrays
      broadcastable to the parameter: a scalar, or [L, 1, ..., 1] for 'layers' leaves.
    num_groups: the number of groups.
    names: the group names in id order ('layers' slices are 'layers_0', ...).
  """
  if isinstance(params, Mapping) and set(params.keys()) == {"params"}:
    groups, num_groups, names = param_groups(params["params"])
    return {"params": groups}, num_groups, names
  if not isinstance(params, Mapping):
    raise TypeError(f"params must be a dict of top-level layers, got {type(params).__name__}")

  names: list[str] = []
  ids: dict[str, Any] = {}
  for key in sorted(params.keys(), key=_natural_key):
    leaves = jax.tree.leaves(params[key])
    if key == SCANNED_KEY and leaves:
      depths = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in leaves}
      if len(depths) != 1 or None in depths:
        raise ValueError(f"every leaf under {SCANNED_KEY!r} needs the same leading (layer) axis; "
                         f"got leading sizes {sorted(map(str, depths))}")
      (depth,) = depths
      ids[key] = (len(names), depth)
      names.extend(f"{key}_{i}" for i in range(depth))
    else:
      ids[key] = (len(names), None)
      names.append(key)

  def leaf_groups(key, leaf):
    first, depth = ids[key]
    if depth is None:
      return np.asarray(first, np.int32)
    shape = (depth,) + (1,) * (np.ndim(leaf) - 1)
    return (first + np.arange(depth, dtype=np.int32)).reshape(shape)

  groups = {key: jax.tree.map(lambda leaf, k=key: leaf_groups(k, leaf), params[key])
            for key in params.keys()}
  return groups, len(names), tuple(names)


# ----------------------------------------------------------------------------------------
# Statistics of one batch.


def predictive_entropy(logits: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """H(B_t) of eq. 67: mean over real positions of the next-token predictive entropy.

  Args:
    logits: [B, T, V] (any float dtype; computed in float32 from log_softmax, so a
      position with a very confident prediction gives 0, not NaN).
    mask: [B, T], nonzero for real positions; None means all positions are real.

  Returns:
    A float32 scalar in nats (0 when the mask selects nothing).
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  # Where p underflows to 0, logp may be -inf (logits at finfo.min): 0 * -inf must be 0,
  # and the select sits inside the product so that the gradient stays finite too.
  p = jnp.exp(logp)
  ent = -jnp.sum(p * jnp.where(p > 0, logp, 0.0), axis=-1)
  return _masked_mean(ent, mask)


def _masked_mean(x: jax.Array, mask: jax.Array | None) -> jax.Array:
  if mask is None:
    return jnp.mean(x)
  m = mask.astype(jnp.float32)
  return jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)


def feedback_loss(entropy: jax.Array, alpha: float | jax.Array,
                  target: float | jax.Array = 0.0) -> jax.Array:
  """L_fb = (alpha / 2) * (H(B_t) - x*)^2, SPEC 5's reading of eq. 61 (f(x) = x - x*).

  `target` is x*; treat it as a constant (pass a stop-gradient value): the term then
  moves H toward x* from either side.

  A Python `alpha == 0` returns a constant 0 that does not depend on the entropy, so the
  loss and its gradient are bit for bit those of plain MLE. (A traced alpha = 0 gives a
  zero term and a zero gradient contribution too, but XLA may then fuse the shared
  log-softmax differently: equal to float32 rounding, not bitwise.)
  """
  if isinstance(alpha, (int, float)) and alpha == 0:
    return jnp.zeros((), jnp.float32)
  return 0.5 * alpha * jnp.square(entropy - target)


def global_norm(tree: PyTree) -> jax.Array:
  """The L2 norm of all leaves together, accumulated in float32."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def group_fisher(grads: PyTree, groups: PyTree, num_groups: int) -> jax.Array:
  """[num_groups] mean squared gradient per group: the diagonal empirical Fisher (SPEC 6).

  Each gradient leaf is first reduced over the axes its group array broadcasts along,
  so nothing of the parameters' size is materialised besides the squares. `groups`
  must be concrete (NumPy) arrays, as `param_groups` returns them.
  """
  sums = jnp.zeros((num_groups,), jnp.float32)
  counts = np.zeros((num_groups,), np.float64)
  for g, gid in zip(jax.tree.leaves(grads), jax.tree.leaves(groups)):
    gid = np.asarray(gid)
    g2 = jnp.square(g.astype(jnp.float32))
    gid_full = np.broadcast_to(gid, (1,) * (g2.ndim - gid.ndim) + gid.shape)
    axes = tuple(i for i, (n, m) in enumerate(zip(g2.shape, gid_full.shape)) if m == 1 and n != 1)
    partial = jnp.sum(g2, axis=axes, keepdims=True) if axes else g2
    per_id = g2.size // max(partial.size, 1)
    gid_b = np.broadcast_to(gid_full, partial.shape).reshape(-1)
    sums = sums.at[gid_b].add(partial.reshape(-1))
    np.add.at(counts, gid_b, per_id)
  return sums / jnp.asarray(np.maximum(counts, 1), jnp.float32)


def token_rarity(tokens: jax.Array, mask: jax.Array | None, neg_log_freq: jax.Array) -> jax.Array:
  """Mean -log unigram frequency of the batch's real tokens (SPEC 6 feature).

  Args:
    tokens: int [B, T]. mask: [B, T] nonzero for real tokens, or None.
    neg_log_freq: [V] float, -log of each token's training-set frequency.
  """
  return _masked_mean(jnp.asarray(neg_log_freq, jnp.float32)[tokens], mask)


def learning_complexity(model_config: ModelConfig, seq_len: int) -> float:
  """c~ of eq. 63, computed analytically as a share of forward matmul FLOPs.

  Eq. 63 defines c~ = T_actual / T_full, a time ratio. SPEC 6 replaces time by the share
  of the forward pass's matmul FLOPs that the DMU/DTU configuration does per sequence
  of `seq_len` tokens (an interpretation; elementwise work, the DTU's key sampling and
  embedding gathers are not counted). With d = d_model, f = d_ff, V = vocab_size, per
  token and layer:

    QKV + output projections  8 d^2                      (unchanged)
    MLP                        4 d f  x  m                (m = c~^2 for node modes
                                                           'dfix'/'dprob', c~ for edge
                                                           modes 'dmu2_*', 1 when off)
    attention scores + values  4 d n_i  for query i       (n_i = number of allowed keys:
                                                           i + 1 causal, seq_len else;
                                                           min(a3, n_i) with the DTU)
  and per token once: logits 2 d V, plus the BERT MLM head's transform 2 d^2. Hence

    c~ = [L (8 d^2 T + 4 d f T m + 4 d sum_i min(a3, n_i)) + T * head]
         / [L (8 d^2 T + 4 d f T     + 4 d sum_i n_i)          + T * head],

  i.e. the attention term is weighted by FLOPs (a FLOP-weighted average over queries of
  min(a3, n_i) / n_i), and causal masking is accounted for (the full model's attention
  counts only the i + 1 allowed keys). Exactly 1.0 when both units are off.
  """
  cfg = model_config
  dmu_on = cfg.dmu.enabled and cfg.dmu.c_tilde < 1.0
  dtu_on = cfg.dtu.enabled
  if not dmu_on and not dtu_on:
    return 1.0
  d, f, v, t, layers = cfg.d_model, cfg.d_ff, cfg.vocab_size, int(seq_len), cfg.num_layers
  allowed = np.arange(1, t + 1) if cfg.causal else np.full(t, t)
  kept = np.minimum(cfg.dtu.keep, allowed) if dtu_on else allowed
  if not dmu_on:
    mlp_share = 1.0
  elif cfg.dmu.mode in ("dfix", "dprob"):
    mlp_share = cfg.dmu.c_tilde ** 2
  else:
    mlp_share = cfg.dmu.c_tilde
  head = 2 * d * v + (2 * d * d if cfg.arch == "bert" else 0)
  proj = 8 * d * d * t
  mlp = 4 * d * f * t
  full = layers * (proj + mlp + 4 * d * float(allowed.sum())) + t * head
  actual = layers * (proj + mlp * mlp_share + 4 * d * float(kept.sum())) + t * head
  return float(actual / full)


def neg_log_unigram_freq(counts: np.ndarray, smoothing: float = 1.0) -> np.ndarray:
  """-log of add-`smoothing` unigram frequencies from token counts [V] (for `token_rarity`)."""
  c = np.asarray(counts, np.float64) + smoothing
  return (-np.log(c / c.sum())).astype(np.float32)


__all__ = [
    "feedback_loss", "global_norm", "group_fisher",
    "learning_complexity", "neg_log_unigram_freq", "param_groups", "predictive_entropy",
    "token_rarity",
]
