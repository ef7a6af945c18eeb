"""The paper's theoretical quantities on the synthetic language (SPEC sections 8 and 9).

On `--data=synthetic` the empirical distribution P_emp of the n training sequences is
known exactly: its support S_0 is the K unique training sequences, with probabilities
p_emp [K] (counts / n). Given the model's log-probabilities of those sequences,
`model_logp` [K] (complete sequences, EOS included, so that P_theta sums to at most 1
over all sequences), these functions give

* P_theta(S_0), the mass on the empirical support (Theorem 5.5, eq. 60),
* d(P_emp || P_theta), the forward KL that MLE minimises (eq. 6, Lemma 4.2),
* H(P_emp), and the MLE loss, which Lemma 4.2 (eq. 26) splits exactly into the two,
* H(P_theta), estimated by Monte Carlo from sequences sampled from the model.

S_0 and p_emp come from `stabjax.data.synthetic.empirical_distribution` (its
`sequences`, `mask` and `p_emp`); `sequence_logprob` of a causal LM on those rows gives
`model_logp`. Everything except `sequence_logprob` is NumPy in float64 and returns
Python floats.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def sequence_logprob(logits: jax.Array, tokens: jax.Array, mask: jax.Array) -> jax.Array:
  """log P_theta(y) of each row under a causal LM: [n, T, V], [n, T], [n, T] -> [n].

  logits[:, t] predicts tokens[:, t + 1]; the sum runs over the real positions
  t >= 1 (mask true), so the first token (BOS) is conditioned on, not scored, and the
  EOS, when inside the mask, is scored. float32 `log_softmax`, stable for large logits.
  """
  logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32)[:, :-1], axis=-1)
  target = jnp.asarray(tokens)[:, 1:]
  token_logp = jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
  # where, not a product: a padding target may have logp = -inf, and -inf * 0 is nan.
  return jnp.sum(jnp.where(jnp.asarray(mask)[:, 1:] > 0, token_logp, 0.0), axis=-1)


def _p_and_logp(p_emp: Any, model_logp: Any) -> tuple[np.ndarray, np.ndarray]:
  p = np.asarray(p_emp, np.float64)
  logp = np.asarray(model_logp, np.float64)
  if p.ndim != 1 or p.shape != logp.shape:
    raise ValueError(f"p_emp {p.shape} and model_logp {logp.shape} must be the same [K]")
  if np.any(p < 0) or not math.isclose(p.sum(), 1.0, abs_tol=1e-6):
    raise ValueError(f"p_emp must be a distribution (nonnegative, sums to 1), sums to {p.sum()}")
  return p, logp


def support_mass(model_logp: Any) -> float:
  """P_theta(S_0) = sum_k exp(model_logp[k]) (Theorem 5.5): model mass on the training support."""
  return float(np.exp(np.asarray(model_logp, np.float64)).sum())


def empirical_entropy(p_emp: Any) -> float:
  """H(P_emp) = -sum p log p in nats (eq. 25); terms with p = 0 contribute 0."""
  p = np.asarray(p_emp, np.float64)
  p = p[p > 0]
  return float(-(p * np.log(p)).sum())


def forward_kl(p_emp: Any, model_logp: Any) -> float:
  """d(P_emp || P_theta) = sum_k p_k (log p_k - log P_theta(y_k)) in nats (eq. 6).

  Only the support of P_emp enters, which is why MLE says nothing about the model
  outside it. `inf` when the model gives a training sequence probability 0.
  """
  p, logp = _p_and_logp(p_emp, model_logp)
  on = p > 0
  return float((p[on] * (np.log(p[on]) - logp[on])).sum())


def mle_loss(p_emp: Any, model_logp: Any) -> float:
  """-sum_k p_k log P_theta(y_k): the mean sequence NLL over the n training sequences.

  With p_emp = counts / n this is exactly (1/n) sum_i -log P_theta(y_i) over the
  sequences with their repeats, and Lemma 4.2 (eq. 26) reads
  mle_loss = forward_kl + empirical_entropy.
  """
  p, logp = _p_and_logp(p_emp, model_logp)
  on = p > 0
  return float(-(p[on] * logp[on]).sum())


def model_entropy_mc(sample_logps: Any) -> tuple[float, float]:
  """H(P_theta) by Monte Carlo: (mean, standard error) of -log P_theta(y), y ~ P_theta.

  `sample_logps` [m] are the model's log-probabilities of m sequences sampled from the
  model itself (temperature 1, no truncation, or the estimate is of another
  distribution). Standard error = sample std (ddof=1) / sqrt(m); `nan` for m < 2.
  """
  nll = -np.asarray(sample_logps, np.float64).reshape(-1)
  if nll.size == 0:
    return math.nan, math.nan
  stderr = float(nll.std(ddof=1) / math.sqrt(nll.size)) if nll.size > 1 else math.nan
  return float(nll.mean()), stderr


def synthetic_metrics(p_emp: Any, model_logp: Any, sample_logps: Any = None) -> dict[str, float]:
  """All of the above for one model as a flat dict (SPEC 9, "On synthetic")."""
  out = {
      "support_mass": support_mass(model_logp),
      "forward_kl": forward_kl(p_emp, model_logp),
      "empirical_entropy": empirical_entropy(p_emp),
      "mle_loss": mle_loss(p_emp, model_logp),
  }
  if sample_logps is not None:
    out["model_entropy"], out["model_entropy_stderr"] = model_entropy_mc(sample_logps)
  return out
