"""The optimizer of a run: base optimizer, PSU, and a step that touches only its sub-network.

    tx = masked_step(optax.chain(clip, adamw | sgd, psu(...)))

The paper's update analysis (eq. 69, 79) assumes that a step changes only the sampled
sub-network: the DMU's kept weights, within the PSU's active groups S_t. Masked weights
get a zero gradient, but AdamW's momentum (and decoupled weight decay) would still move
them. `masked_step` keeps every entry outside the step's sub-network exactly as it was:

* its parameter (a zero update), and
* its optimizer state: Adam's first and second moments of a masked entry are neither
  decayed nor fed the zero gradient, as in sparse ("lazy") Adam. A weight that sits out
  a step resumes with the moments it had, so the update it gets when it is next
  sampled is the one it would have got had the masked steps not happened. Adam's step
  count (bias correction) is global and advances every step.

`--optimizer=sgd` is plain SGD with L2 weight decay, the setting of the paper's theory
(Lemma 4.1): g + lambda theta, no momentum.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from stabjax.feedback import param_groups
from stabjax.psu import PSUConfig, find_psu_state, group_scale, psu

PyTree = Any


def decay_mask(params: PyTree) -> PyTree:
  """Weight decay on kernels and embeddings only, not on biases or LayerNorm scales."""
  def keep(path, _):
    name = str(getattr(path[-1], "key", path[-1]))
    return not (name.endswith("bias") or name == "scale")
  return jax.tree_util.tree_map_with_path(keep, params)


def lr_schedule(t: Any) -> optax.Schedule:
  """Linear warmup from 0, then cosine decay to lr * min_lr_ratio at the last step.

  `t` is a TrainConfig, or anything with its scalar fields (traced values included: no
  Python branch depends on them, unlike `optax.warmup_cosine_decay_schedule`).
  """
  def schedule(count):
    count = jnp.asarray(count, jnp.float32)
    steps = jnp.asarray(t.steps, jnp.float32)
    warmup = jnp.where(steps > 1, jnp.minimum(jnp.asarray(t.warmup_steps, jnp.float32),
                                              steps - 1), 0.0)
    warm = count / jnp.maximum(warmup, 1.0)
    frac = jnp.clip((count - warmup) / jnp.maximum(steps - warmup, 1.0), 0.0, 1.0)
    cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    ratio = jnp.asarray(t.min_lr_ratio, jnp.float32)
    shape = jnp.where(count < warmup, warm, (1.0 - ratio) * cosine + ratio)
    return jnp.asarray(t.lr, jnp.float32) * shape
  return schedule


def base_optimizer(t: Any) -> optax.GradientTransformation:
  """AdamW (decoupled decay), or SGD on the L2-regularised loss (`t.optimizer`)."""
  if t.optimizer == "sgd":
    return optax.chain(optax.add_decayed_weights(t.weight_decay, mask=decay_mask),
                       optax.sgd(lr_schedule(t)))
  return optax.adamw(lr_schedule(t), b1=t.b1, b2=t.b2, weight_decay=t.weight_decay,
                     mask=decay_mask)


def make_optimizer(t: Any, psu_config: PSUConfig, c_tilde: float, seed: Any = None
                   ) -> optax.GradientTransformationExtraArgs:
  """masked_step(chain(clip, base optimizer[, PSU])) for one run.

  `t`: a TrainConfig, or a `train.StepScalars` of traced values with `optimizer` (the
  transformation's structure depends only on `t.optimizer` and `psu_config`). `seed`
  (default `t.seed`) seeds the PSU's init.
  """
  parts = [optax.clip_by_global_norm(t.clip_norm), base_optimizer(t)]
  if psu_config.enabled:
    parts.append(psu(psu_config, alpha=t.alpha, c_tilde=c_tilde,
                     seed=t.seed if seed is None else seed))
  return masked_step(optax.chain(*parts))


def map_params_like(f, treedef, state, *rest, other=lambda x, *_: x):
  """f(subtree, *rest_subtrees) on every subtree of `state` with the params' structure
  `treedef` (Adam's mu and nu, a momentum trace...); other(leaf, *rest_leaves) elsewhere.

  Unlike `optax.tree_map_params` it needs no `init` call on a placeholder, which the PSU
  (whose state's shapes depend on the params' groups) cannot take.
  """
  is_params = lambda x: jax.tree.structure(x) == treedef
  return jax.tree.map(lambda x, *r: f(x, *r) if is_params(x) else other(x, *r), state, *rest,
                      is_leaf=is_params)


def _is_all(m) -> bool:
  return isinstance(m, bool) and m


def masked_step(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """`inner`, with every entry outside the step's sub-network left exactly as it was.

  The sub-network is the extra arg `touched` (a tree with the params' structure of
  bools broadcastable to each parameter, a Python True for "all of it"; None: all),
  intersected with the PSU's active groups S_t when `inner` holds a PSU. Outside it
  the update is zero and every params-shaped leaf of `inner`'s state (e.g. Adam's
  moments) keeps its old value. `touched` is passed on to `inner` too.
  """
  inner = optax.with_extra_args_support(inner)

  def update_fn(updates, state, params=None, *, touched=None, **extra):
    new_updates, new_state = inner.update(updates, state, params, touched=touched, **extra)
    treedef = jax.tree.structure(updates)
    masks = [True] * treedef.num_leaves if touched is None else treedef.flatten_up_to(touched)
    ps = find_psu_state(new_state)
    if ps is not None:
      groups, _, _ = param_groups(updates)
      active = treedef.flatten_up_to(group_scale(ps.active, groups))
      masks = [a if _is_all(m) else m & a for m, a in zip(masks, active)]
    if all(_is_all(m) for m in masks):
      return new_updates, new_state
    keep = lambda m, new, old: new if _is_all(m) else jnp.where(m, new, old)
    select = lambda new, old: treedef.unflatten(
        [keep(m, a, b) for m, a, b in zip(masks, treedef.flatten_up_to(new),
                                          treedef.flatten_up_to(old))])
    new_updates = select(new_updates, jax.tree.map(jnp.zeros_like, new_updates))
    new_state = map_params_like(select, treedef, new_state, state)
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)
