r"""Exact distribution-level quantities of a model, and numerical checks of the paper's claims.

On `EnumerableLanguage` (stabjax/data/enumerable.py) every sequence of the language can
be listed (N = 1884 for 12 words and at most 3 words), so the quantities the paper's
sections 3-5 reason about are computed exactly from one forward pass over the
enumeration instead of being estimated from samples:

* `exact_model_distribution`: log P_theta(y) of every sequence y of the language (BOS
  conditioned on, EOS scored), and what the model puts elsewhere. The model is a
  distribution over token strings, not over the language, so sum_y P_theta(y) <= 1; the
  rest (`mass_outside`) splits into `past_cap` (the model writes the K-th word and then
  does not emit EOS: it would continue past the language's length cap) and
  `off_language` (a non-word token, or EOS right after BOS, before the cap).
* `support_mass` P_theta(S_0), `forward_kl` d(P_emp || P_theta), `model_entropy`
  H(P_theta) restricted to the language's sequences, and `mode_collapse_set`
  (Definition 3.2).
* `train_sgd`: the setting of Lemma 4.1: full-batch gradient descent on eq. 3 with L2 on
  every parameter (or on the trainer's decay mask), a constant or diminishing rate,
  recording ||theta_t|| and the stationarity residual ||grad L(theta_t) + lambda theta_t||
  at every step; `polish`: L-BFGS from its end toward a stationary point theta*.

Units (read before comparing with the paper). The paper's objective is eq. 3,
L_lambda(theta) = -(1/n) sum_i log G_theta(y_i) + (lambda/2) ||theta||^2, a mean over
sequences; `train_sgd` minimises exactly that. The project's trainer
(`stabjax.train.Trainer`, --optimizer=sgd) minimises the mean over *tokens*,
L_tok = sum_i -log G_theta(y_i) / sum_i len_i = L / l_bar (l_bar: mean predicted tokens
per training row, fixed when every step is the whole training set), plus
(lambda_tok / 2) ||m theta||^2 where m is `optim.decay_mask` (kernels and embeddings;
biases and LayerNorm scales are not decayed). So

    grad L_tok + lambda_tok m theta = (1 / l_bar) (grad L + lambda m theta),
    lambda = lambda_tok * l_bar,       a step of lr on L_tok = a step of lr / l_bar on L,

which `check_trainer_equivalence` verifies step for step. Every quantity here is in the
paper's units: lambda is eq. 3's, L the per-sequence NLL, and the residual
||grad L + lambda m theta|| with m = 1 (decay='all', the paper's ||theta||^2) unless a
run says decay='trainer'.

The checks (`check_*`) each return a dict of measured numbers with a bool `holds`;
their claims, tolerances and readings are in their docstrings and in
experiments/theory.py's report.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from stabjax import configs, degeneration, feedback, metrics, optim, sampling
from stabjax import psu as psu_lib
from stabjax.data.enumerable import EnumerableLanguage, EnumeratedEmpirical
from stabjax.data.synthetic import BOS_ID, EOS_ID, MASK_ID, NUM_RESERVED, PAD_ID
from stabjax.models import dmu as dmu_lib

PyTree = Any


# ------------------------------------------------------------------------ exact distribution


@dataclasses.dataclass(frozen=True, eq=False)
class ExactDistribution:
  """P_theta over every sequence of an `EnumerableLanguage`.

  Attributes:
    logp: float64 [N], log P_theta of each enumerated sequence (index of
      `lang.all_sequences()`): sum over its words and its EOS of log p(token | prefix).
    past_cap: P_theta of the strings that start with K words (the cap) and do not
      continue with EOS; the model would go on past the language's last position.
  """

  logp: np.ndarray
  past_cap: float

  @property
  def probs(self) -> np.ndarray:
    return np.exp(self.logp)

  @property
  def total(self) -> float:
    """sum_y P_theta(y) over the language: <= 1."""
    return float(self.probs.sum())

  @property
  def mass_outside(self) -> float:
    """1 - total: what the model puts on strings that are not sequences of the language."""
    return 1.0 - self.total

  @property
  def off_language(self) -> float:
    """mass_outside - past_cap: a non-word token (or EOS right after BOS) before the cap."""
    return self.mass_outside - self.past_cap


def exact_model_distribution(model: nn.Module, params: PyTree, lang: EnumerableLanguage,
                             batch_size: int = 8192) -> ExactDistribution:
  """log P_theta of every sequence of `lang` (`degeneration.sequence_logprobs`), and past_cap.

  past_cap = sum over the K-word prefixes of P(prefix) (1 - p(EOS | prefix)), from the
  same function on the K-word rows with their EOS masked out (P(prefix)) and in
  (P(prefix) p(EOS | prefix)).
  """
  tokens, mask = lang.all_sequences()
  full = mask.sum(axis=1) == lang.max_len  # the K-word rows: EOS in the last column
  prefix_mask = mask[full].copy()
  prefix_mask[:, -1] = 0
  both = degeneration.sequence_logprobs(
      model, params, np.concatenate([tokens, tokens[full]]),
      np.concatenate([mask, prefix_mask]), batch_size=batch_size)
  both = np.asarray(both, np.float64)
  logp, prefix_logp = both[:len(tokens)], both[len(tokens):]
  past_cap = float(np.sum(np.exp(prefix_logp) - np.exp(logp[full])))
  return ExactDistribution(logp=logp, past_cap=max(past_cap, 0.0))


def support_mass(dist: ExactDistribution, emp: EnumeratedEmpirical) -> float:
  """P_theta(S_0): the model's mass on the training support (Theorem 5.5, eq. 59)."""
  return float(np.exp(dist.logp[emp.index]).sum())


def forward_kl(dist: ExactDistribution, emp: EnumeratedEmpirical) -> float:
  """d(P_emp || P_theta) = sum_{y in S_0} P_emp(y) log(P_emp(y) / P_theta(y)) (eq. 17)."""
  return metrics.forward_kl(emp.p_emp, dist.logp[emp.index])


def model_entropy(dist: ExactDistribution) -> float:
  """-sum_{y in language} P_theta(y) log P_theta(y), nats.

  Restricted to the language's sequences and not renormalised: the strings outside
  (mass `mass_outside`) are left out, so this is H(P_theta) exactly when
  mass_outside = 0 and a lower bound on the part of H(P_theta) they carry otherwise.
  """
  p = dist.probs
  return float(-(p * dist.logp).sum())


@dataclasses.dataclass(frozen=True)
class ModeCollapseSet:
  """The smallest S in the language with P_theta(S) >= 1 - eps (Definition 3.2).

  Attributes:
    eps: the epsilon asked for.
    exists: False when no subset of the language reaches 1 - eps (mass_outside > eps).
    indices: int64 [|S|], enumeration indices of S, most probable first (all sequences
      of the language when not `exists`).
    size: |S|.
    mass: P_theta(S).
    fraction: |S| / |X|, X the language's N sequences.
  """

  eps: float
  exists: bool
  indices: np.ndarray
  size: int
  mass: float
  fraction: float


def mode_collapse_set(dist: ExactDistribution, eps: float) -> ModeCollapseSet:
  """Definition 3.2 on the enumeration: the smallest S with P_theta(S) >= 1 - eps.

  Reading: P_theta exhibits mode collapse at level eps when some S with |S| << |X| has
  P_theta(S) >= 1 - eps. The smallest such S is the top sequences by P_theta until
  their mass reaches 1 - eps (greedy is optimal for a cardinality-constrained mass), so
  "mode collapse at eps" is the statement that this S's `fraction` |S| / |X| is small;
  the definition fixes no threshold for <<, so none is applied here: callers compare
  `size` with e.g. K = |S_0| (Theorem 5.5's |S| = K). X is the language (N sequences),
  the sample space the paper's P_theta is a distribution on; mass the model puts on
  other strings cannot be covered by any S within X, so `exists` is False when
  mass_outside > eps.
  """
  if not 0.0 < eps < 1.0:
    raise ValueError(f"eps must be in (0, 1), got {eps}")
  p = dist.probs
  order = np.argsort(-p, kind="stable")
  cum = np.cumsum(p[order])
  target = 1.0 - eps - 1e-12  # float rounding of the cumulative sum
  exists = bool(cum[-1] >= target)
  size = int(np.searchsorted(cum, target) + 1) if exists else p.size
  idx = order[:size].astype(np.int64)
  return ModeCollapseSet(eps=float(eps), exists=exists, indices=idx, size=size,
                         mass=float(cum[size - 1]), fraction=size / p.size)


# ---------------------------------------------------------------------------- chi-square


def wilson_hilferty_quantile(df: int, z: float) -> float:
  """The chi-square(df) quantile at the standard-normal quantile z (Wilson-Hilferty 1931)."""
  c = 2.0 / (9.0 * df)
  return df * (1.0 - c + z * math.sqrt(c)) ** 3


def wilson_hilferty_pvalue(stat: float, df: int) -> float:
  """P(chi-square(df) >= stat) by the Wilson-Hilferty normal approximation."""
  c = 2.0 / (9.0 * df)
  z = ((stat / df) ** (1.0 / 3.0) - (1.0 - c)) / math.sqrt(c)
  return 0.5 * math.erfc(z / math.sqrt(2.0))


def pooled_chi_square(observed: np.ndarray, expected: np.ndarray, min_expected: float = 5.0
                      ) -> tuple[float, int, int]:
  """Pearson's statistic after pooling every cell with expected count < min_expected.

  The pooled cells form one cell; if its expected count is still < min_expected it is
  merged into the remaining cell with the smallest expected count.
  Returns (statistic, degrees of freedom = cells - 1, cells).
  """
  observed = np.asarray(observed, np.float64)
  expected = np.asarray(expected, np.float64)
  small = expected < min_expected
  obs, exp = observed[~small], expected[~small]
  if small.any():
    o, e = observed[small].sum(), expected[small].sum()
    if e >= min_expected or obs.size == 0:
      obs, exp = np.append(obs, o), np.append(exp, e)
    else:
      i = int(np.argmin(exp))
      obs, exp = obs.copy(), exp.copy()
      obs[i] += o
      exp[i] += e
  stat = float(((obs - exp) ** 2 / exp).sum())
  return stat, int(obs.size - 1), int(obs.size)


def sample_categories(lang: EnumerableLanguage, tokens: np.ndarray, gen_mask: np.ndarray
                      ) -> np.ndarray:
  """Cell of each sample from BOS: its enumeration index, N for past_cap, N + 1 off-language.

  tokens [B, 1 + G] (BOS then G >= K + 1 generated tokens), gen_mask [B, G].
  """
  n = lang.num_sequences
  mask = np.concatenate([np.ones_like(tokens[:, :1]), np.asarray(gen_mask, np.int32)], axis=1)
  idx = lang.index_of(np.asarray(tokens), mask)
  k = lang.max_words
  words = (tokens[:, 1:k + 1] >= NUM_RESERVED).all(axis=1)
  past = (idx < 0) & words & (tokens[:, k + 1] != EOS_ID)
  return np.where(idx >= 0, idx, np.where(past, n, n + 1))


def check_chi_square(model: nn.Module, params: PyTree, lang: EnumerableLanguage,
                     key: jax.Array, num_samples: int = 20_000, z: float = 3.09,
                     dist: ExactDistribution | None = None, batch_size: int = 20_000
                     ) -> dict[str, Any]:
  """The exact enumeration agrees with the KV-cache sampler's frequencies (Pearson test).

  `num_samples` sequences from BOS by `sampling.generate` (temperature 1, K + 1 new
  tokens: the cap's EOS or whatever the model writes instead), each assigned to its
  sequence of the language, or to one of two cells `past_cap` / `off_language`, whose
  exact probabilities come from `exact_model_distribution`. Cells with expected count
  < 5 are pooled. holds: the statistic is below the chi-square(df) quantile at the
  normal quantile z (3.09: a 0.1% false-alarm rate), by Wilson-Hilferty.
  """
  dist = exact_model_distribution(model, params, lang) if dist is None else dist
  new = lang.max_words + 1
  cfg = sampling.SamplingConfig(max_new_tokens=new, temperature=1.0)
  cells = []
  for i, start in enumerate(range(0, num_samples, batch_size)):
    b = min(batch_size, num_samples - start)
    prompts = np.full((b, 1), BOS_ID, np.int32)
    out = sampling.generate(model, params, jnp.asarray(prompts), jnp.ones((b, 1), jnp.int32),
                            jax.random.fold_in(key, i), cfg, eos_id=EOS_ID, pad_id=PAD_ID)
    out = jax.device_get(out)
    cells.append(sample_categories(lang, np.asarray(out.tokens), np.asarray(out.gen_mask)))
  cells = np.concatenate(cells)
  n = lang.num_sequences
  probs = np.concatenate([dist.probs, [dist.past_cap, max(dist.off_language, 0.0)]])
  observed = np.bincount(cells, minlength=n + 2).astype(np.float64)
  expected = num_samples * probs
  stat, df, ncells = pooled_chi_square(observed, expected)
  threshold = wilson_hilferty_quantile(df, z)
  freq = observed / num_samples
  return {
      "num_samples": num_samples, "cells": ncells, "df": df, "statistic": stat,
      "threshold": threshold, "p_value": wilson_hilferty_pvalue(stat, df),
      "language_mass_exact": dist.total, "language_mass_sampled": float(freq[:n].sum()),
      "past_cap_exact": dist.past_cap, "past_cap_sampled": float(freq[n]),
      "off_language_exact": dist.off_language, "off_language_sampled": float(freq[n + 1]),
      "max_abs_freq_error": float(np.abs(freq - probs).max()),
      "holds": bool(stat <= threshold),
  }


# ------------------------------------------------------------------------------ training


def tiny_model_config(lang: EnumerableLanguage, num_layers: int = 1, d_model: int = 32,
                      d_ff: int = 64, num_heads: int = 2) -> configs.ModelConfig:
  """gpt2_tiny shrunk to the enumerable language (DMU/DTU off, no dropout)."""
  return configs.get_model_config("gpt2_tiny", vocab_size=lang.vocab_size,
                                  num_layers=num_layers, d_model=d_model, d_ff=d_ff,
                                  num_heads=num_heads, max_len=lang.max_len)


def init_model_params(model_config: configs.ModelConfig, seed: int = 0) -> PyTree:
  """The model's initial parameters for PRNGKey(seed) (what `train_sgd` starts from)."""
  from stabjax.models import init_params
  return init_params(model_config, jax.random.PRNGKey(seed), seq_len=model_config.max_len)


@functools.partial(jax.jit, static_argnames="model")
def _seq_logprobs(model: nn.Module, params, tokens, mask):
  logits = model.apply({"params": params}, tokens, deterministic=True)
  return metrics.sequence_logprob(logits, tokens, mask)


def sequence_nll(model: nn.Module, params: PyTree, tokens: np.ndarray, mask: np.ndarray
                 ) -> float:
  """(1/n) sum_i -log P_theta(y_i): the paper's L(theta) (eq. 3 without the penalty)."""
  lp = _seq_logprobs(model, params, jnp.asarray(tokens), jnp.asarray(mask))
  return float(-np.mean(np.asarray(lp, np.float64)))


@jax.jit
def _tree_norm(tree: PyTree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def tree_norm(tree: PyTree) -> float:
  """Euclidean norm of all leaves together."""
  return float(_tree_norm(tree))


@functools.partial(jax.jit, static_argnames="model")
def _loss_and_grad(model: nn.Module, params, tokens, mask):
  return jax.value_and_grad(lambda p: _seq_loss(model, p, tokens, mask))(params)


def stationarity(model: nn.Module, params: PyTree, tokens: np.ndarray, mask: np.ndarray,
                 lam: float, decay: str = "all") -> dict[str, float]:
  """Full-batch L, ||grad L||, ||theta||, ||m theta|| and ||grad L + lam m theta|| (paper units).

  m: `decay_tree(params, decay)`. jax.grad of the per-sequence NLL (eq. 3).
  """
  loss, grad = _loss_and_grad(model, params, jnp.asarray(tokens), jnp.asarray(mask))
  md = jax.tree.map(lambda p, m: m * p, params, decay_tree(params, decay))
  residual = jax.tree.map(lambda g, p: g + lam * p, grad, md)
  return {"loss": float(loss), "grad_norm": tree_norm(grad), "param_norm": tree_norm(params),
          "decayed_norm": tree_norm(md), "residual": tree_norm(residual)}


# ------------------------------------------------------------------------------ training

DECAY = ("all", "trainer")


def decay_tree(params: PyTree, decay: str) -> PyTree:
  """1.0 on the leaves the L2 penalty acts on: every leaf ('all', the paper's ||theta||^2)
  or `optim.decay_mask`'s kernels and embeddings ('trainer', biases and LayerNorm scales
  left out)."""
  if decay == "all":
    return jax.tree.map(lambda _: jnp.float32(1.0), params)
  if decay == "trainer":
    return jax.tree.map(lambda keep: jnp.float32(1.0 if keep else 0.0), optim.decay_mask(params))
  raise ValueError(f"decay must be one of {', '.join(DECAY)}, got {decay!r}")


def _seq_loss(model: nn.Module, params, tokens, mask):
  logits = model.apply({"params": params}, tokens, deterministic=True)
  return -jnp.mean(metrics.sequence_logprob(logits, tokens, mask))


def _norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


@functools.partial(jax.jit, static_argnames=("model", "num"))
def _gd_chunk(model: nn.Module, params, tokens, mask, dmask, lam, lr0, tau, t0, stop,
              num: int):
  """Full-batch steps t = t0..stop-1 (at most `num`) of theta <- theta - eta_t (grad L + lam m theta),
  eta_t = lr0 / (1 + t / tau); the slots from `stop` to t0 + num are skipped (one
  compilation serves every step count).

  Records, before each step, L(theta_t), ||grad L + lam m theta_t|| and ||theta_t||.
  """
  def step(p, t):
    loss, g = jax.value_and_grad(lambda q: _seq_loss(model, q, tokens, mask))(p)
    r = jax.tree.map(lambda gi, pi, mi: gi + lam * mi * pi, g, p, dmask)
    eta = lr0 / (1.0 + t / tau)
    new = jax.tree.map(lambda pi, ri: pi - eta * ri, p, r)
    return new, (loss, _norm(r), _norm(p))

  def skip(p, t):
    zero = jnp.zeros((), jnp.float32)
    return p, (zero, zero, zero)

  def body(p, t):
    return jax.lax.cond(t < stop, step, skip, p, t)

  return jax.lax.scan(body, params, t0 + jnp.arange(num, dtype=jnp.float32))


@dataclasses.dataclass
class SGDRun:
  """One full-batch SGD + L2 run (`train_sgd`), in the paper's units (module docstring).

  Attributes:
    model, model_config, params: the model and its final parameters theta_T.
    lam: lambda of eq. 3 (per-sequence loss).
    lr, tau: eta_t = lr / (1 + t / tau) (tau = inf: constant; finite: the diminishing
      rate of eq. 4, sum eta = inf, sum eta^2 < inf).
    decay: 'all' (the paper's ||theta||^2) or 'trainer' (`optim.decay_mask`).
    steps: T.
    loss, residual, param_norm: float64 [T + 1], at theta_0..theta_T: L(theta_t),
      ||grad L(theta_t) + lam m theta_t|| and ||theta_t|| (then the L-BFGS iterates when
      `polish` continued the run: [T + 1 + polish_iters]).
    polish_iters: L-BFGS iterations after the descent (`polish`).
  """

  model: nn.Module
  model_config: configs.ModelConfig
  params: PyTree
  lam: float
  lr: float
  tau: float
  decay: str
  steps: int
  loss: np.ndarray
  residual: np.ndarray
  param_norm: np.ndarray
  polish_iters: int = 0

  def lr_at(self, t: int) -> float:
    return self.lr / (1.0 + t / self.tau)


def train_sgd(lang: EnumerableLanguage, tokens: np.ndarray, mask: np.ndarray, lam: float,
              lr: float, steps: int, *, tau: float = math.inf, decay: str = "all",
              seed: int = 0, model_config: configs.ModelConfig | None = None,
              params: PyTree | None = None, chunk: int = 1000,
              progress: Callable[[int], None] | None = None) -> SGDRun:
  """Full-batch gradient descent on eq. 3, L(theta) + (lam / 2) ||m theta||^2 (eq. 4).

  L is the mean per-sequence NLL over the rows of (tokens, mask); every step uses all of
  them (no sampling noise, so stationarity is not masked by minibatch noise). Starts
  from `params` or the model's initialisation with PRNGKey(seed). Runs in jitted scans
  of `chunk` steps (one compilation for every lam, lr, tau and step count: a last,
  partial chunk skips its extra slots); `progress(k)` after each.
  """
  from stabjax.models import get_model
  mc = tiny_model_config(lang) if model_config is None else model_config
  model = get_model(mc)
  if params is None:
    params = init_model_params(mc, seed)
  dmask = decay_tree(params, decay)
  tok, msk = jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32)
  losses, residuals, norms = [], [], []
  done = 0
  while done < steps:
    num = min(chunk, steps - done)
    params, (l, r, n) = _gd_chunk(model, params, tok, msk, dmask, jnp.float32(lam),
                                  jnp.float32(lr), jnp.float32(tau), jnp.float32(done),
                                  jnp.float32(done + num), chunk)
    losses.append(np.asarray(l)[:num]); residuals.append(np.asarray(r)[:num])
    norms.append(np.asarray(n)[:num])
    done += num
    if progress is not None:
      progress(num)
  last = stationarity(model, params, tokens, mask, lam, decay)
  losses.append([last["loss"]]); residuals.append([last["residual"]])
  norms.append([last["param_norm"]])
  cat = lambda xs: np.concatenate([np.asarray(x, np.float64) for x in xs])
  run = SGDRun(model=model, model_config=mc, params=jax.device_get(params), lam=float(lam),
               lr=float(lr), tau=float(tau), decay=decay, steps=steps, loss=cat(losses),
               residual=cat(residuals), param_norm=cat(norms))
  if not np.isfinite(run.loss[-1]):
    raise FloatingPointError(f"SGD diverged (lam={lam}, lr={lr}, tau={tau})")
  return run


@functools.lru_cache(maxsize=None)
def _lbfgs(memory: int):
  import optax
  return optax.lbfgs(memory_size=memory)


@functools.partial(jax.jit, static_argnames=("model", "num", "memory"))
def _lbfgs_chunk(model: nn.Module, carry, tokens, mask, dmask, lam, num: int, memory: int):
  """`num` L-BFGS iterations on L_lambda; carry = (params, opt state, best params, best residual)."""
  import optax
  opt = _lbfgs(memory)

  def penalty(p):
    return sum(jnp.sum(m * jnp.square(x)) for x, m in zip(jax.tree.leaves(p),
                                                          jax.tree.leaves(dmask)))

  objective = lambda p: _seq_loss(model, p, tokens, mask) + 0.5 * lam * penalty(p)
  value_and_grad = optax.value_and_grad_from_state(objective)

  def body(carry, _):
    p, s, best, best_r = carry
    v, g = value_and_grad(p, state=s)
    r = _norm(g)
    better = r < best_r
    best = jax.tree.map(lambda a, b: jnp.where(better, a, b), p, best)
    best_r = jnp.where(better, r, best_r)
    u, s = opt.update(g, s, p, value=v, grad=g, value_fn=objective)
    return (optax.apply_updates(p, u), s, best, best_r), (v - 0.5 * lam * penalty(p), r, _norm(p))

  return jax.lax.scan(body, carry, None, length=num)


def polish(run: SGDRun, tokens: np.ndarray, mask: np.ndarray, iters: int = 3000,
           chunk: int = 250, memory: int = 50,
           progress: Callable[[int], None] | None = None) -> SGDRun:
  """`run` continued by full-batch L-BFGS on the same L_lambda, toward a stationary point.

  Gradient descent on the tiny GPT-2 stalls at the edge of stability (its residual stays
  O(1), see `check_stationarity`); the theorems are about stationary points theta*, so
  the checks that need one (Theorem 5.5, the order in lambda) take the descent's end
  and minimise L_lambda further with L-BFGS (optax, zoom line search), which is not
  limited by 2 / lr. In float32 its residual fluctuates from one iterate to the next, so
  the returned parameters are the iterate with the smallest residual (the most nearly
  stationary point met). `steps` still counts the descent's steps; the trajectories are
  extended with the L-BFGS iterates and end with the returned point.
  """
  dmask = decay_tree(run.params, run.decay)
  tok, msk = jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32)
  params = run.params
  # Strong dtypes: optax's init leaves a few weakly typed scalars that one update makes
  # strong, which would compile the chunk twice.
  state = jax.tree.map(lambda x: jnp.array(x, dtype=jnp.asarray(x).dtype),
                       _lbfgs(memory).init(params))
  carry = (params, state, params, jnp.float32(jnp.inf))
  losses, residuals, norms = [], [], []
  done = 0
  while done < iters:
    num = min(chunk, iters - done)
    carry, (l, r, n) = _lbfgs_chunk(run.model, carry, tok, msk, dmask, jnp.float32(run.lam),
                                    num, memory)
    losses.append(np.asarray(l)); residuals.append(np.asarray(r)); norms.append(np.asarray(n))
    done += num
    if progress is not None:
      progress(num)
  best = jax.device_get(carry[2])
  last = stationarity(run.model, best, tokens, mask, run.lam, run.decay)
  cat = lambda head, xs, x: np.concatenate(
      [head[:-1]] + [np.asarray(v, np.float64) for v in xs] + [[x]])
  out = dataclasses.replace(
      run, params=best, polish_iters=run.polish_iters + iters,
      loss=cat(run.loss, losses, last["loss"]),
      residual=cat(run.residual, residuals, last["residual"]),
      param_norm=cat(run.param_norm, norms, last["param_norm"]))
  if not np.isfinite(out.loss[-1]):
    raise FloatingPointError(f"L-BFGS diverged (lam={run.lam})")
  return out


def sharpness(model: nn.Module, params: PyTree, tokens: np.ndarray, mask: np.ndarray,
              lam: float, decay: str = "all", iters: int = 50, seed: int = 0) -> float:
  """Largest-magnitude eigenvalue of the Hessian of L + (lam/2)||m theta||^2 (power iteration).

  beta of Definition 3.1 (3) at theta, locally; gradient descent with a constant rate eta
  is stable near a minimum only if it is < 2 / eta.
  """
  from jax.flatten_util import ravel_pytree
  flat, unravel = ravel_pytree(params)
  dflat, _ = ravel_pytree(jax.tree.map(lambda m, p: jnp.broadcast_to(m, p.shape),
                                       decay_tree(params, decay), params))
  tok, msk = jnp.asarray(tokens), jnp.asarray(mask)
  f = lambda x: _seq_loss(model, unravel(x), tok, msk) + 0.5 * lam * jnp.sum(dflat * x * x)
  hvp = jax.jit(lambda x, v: jax.jvp(jax.grad(f), (x,), (v,))[1])
  v = jax.random.normal(jax.random.PRNGKey(seed), flat.shape)
  v = v / jnp.linalg.norm(v)
  ev = 0.0
  for _ in range(iters):
    w = hvp(flat, v)
    ev = float(v @ w)
    v = w / jnp.linalg.norm(w)
  return ev


# -------------------------------------------------------------------------------- checks


def check_lemma_4_2(model: nn.Module, params: PyTree, lang: EnumerableLanguage,
                    tokens: np.ndarray, mask: np.ndarray, emp: EnumeratedEmpirical | None = None,
                    dist: ExactDistribution | None = None, tol: float = 1e-4) -> dict[str, Any]:
  """Lemma 4.2 (eq. 26): mean NLL of the training set = d(P_emp || P_theta) + H(P_emp).

  Two independent computations: the NLL from the model's logits on the n training rows
  (repeats included: one forward over [n, T]); the KL from the exact enumeration's
  log-probabilities (another forward, over all N sequences) at S_0 and P_emp's counts;
  H(P_emp) from the counts. The model is unconditional (x = BOS for every row), so
  G_theta(x_i; y_i) = P_theta(y_i) and the paper's eq. 24 ("empirical consistency") is
  an identity here. holds: |NLL - KL - H| <= tol * max(1, NLL) (float32 forwards).
  Also reported: the trainer's per-token NLL, which is NLL / l_bar, not KL + H.
  """
  emp = lang.empirical(tokens, mask) if emp is None else emp
  dist = exact_model_distribution(model, params, lang) if dist is None else dist
  lp = np.asarray(_seq_logprobs(model, params, jnp.asarray(tokens), jnp.asarray(mask)),
                  np.float64)
  nll = float(-lp.mean())
  predicted = float(np.asarray(mask)[:, 1:].sum())
  kl = forward_kl(dist, emp)
  h = emp.entropy
  gap = nll - (kl + h)
  return {"n": int(len(tokens)), "support_size": emp.support_size, "nll": nll,
          "forward_kl": kl, "h_emp": h, "kl_plus_h": kl + h, "abs_gap": abs(gap),
          "token_nll": float(-lp.sum() / predicted),
          "mean_tokens": predicted / len(tokens),
          "holds": bool(abs(gap) <= tol * max(1.0, abs(nll)))}


def check_trainer_equivalence(lang: EnumerableLanguage, tokens: np.ndarray, mask: np.ndarray,
                              weight_decay: float = 0.01, lr: float = 0.1, steps: int = 3,
                              seed: int = 0, tol: float = 1e-5) -> dict[str, Any]:
  """The project's SGD step is `train_sgd`'s step in the paper's units (module docstring).

  `steps` steps of `stabjax.train.Trainer` (optimizer 'sgd', weight_decay, lr, constant
  rate, no clipping, PSU off, alpha 0, whole training set as the batch) against
  `train_sgd(decay='trainer', lam=weight_decay * l_bar, lr=lr / l_bar)` from the same
  initial parameters. holds: max |theta_trainer - theta_ours| <= tol * (1 + max |theta|).
  """
  from stabjax.psu import PSUConfig  # the trainer's imports, only here
  from stabjax.sharding import make_mesh
  from stabjax.train import RunConfig, SpecialIds, Trainer

  tokens = np.asarray(tokens, np.int32)
  mask = np.asarray(mask, np.int32)
  n = tokens.shape[0]
  mc = tiny_model_config(lang)
  tc = configs.TrainConfig(optimizer="sgd", weight_decay=weight_decay, lr=lr, clip_norm=1e9,
                           min_lr_ratio=1.0, warmup_steps=0, steps=max(steps, 1),
                           batch_size=n, seq_len=tokens.shape[1], seed=seed, alpha=0.0,
                           mesh="data=1,fsdp=1,tensor=1")
  mesh = make_mesh("data=1,fsdp=1,tensor=1", devices=jax.devices()[:1])
  trainer = Trainer.create(RunConfig(model=mc, train=tc, psu=PSUConfig(enabled=False)),
                           SpecialIds(pad=PAD_ID, bos=BOS_ID, eos=EOS_ID, mask=MASK_ID),
                           mesh=mesh)
  state = trainer.init_state()
  init = jax.device_get(state.params)
  batch = trainer.put_batch({"tokens": tokens, "mask": mask})
  neg_log_freq = jnp.zeros((lang.vocab_size,), jnp.float32)
  for _ in range(steps):
    state, _ = trainer.train_step(state, batch, neg_log_freq)
  theirs = jax.device_get(state.params)
  l_bar = float(mask[:, 1:].sum()) / n
  run = train_sgd(lang, tokens, mask, weight_decay * l_bar, lr / l_bar, steps,
                  decay="trainer", params=init, model_config=mc)
  diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
             for a, b in zip(jax.tree.leaves(theirs), jax.tree.leaves(run.params)))
  moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
              for a, b in zip(jax.tree.leaves(theirs), jax.tree.leaves(init)))
  scale = max(float(np.abs(np.asarray(a)).max()) for a in jax.tree.leaves(theirs))
  return {"steps": steps, "mean_tokens": l_bar, "lambda_tok": weight_decay,
          "lambda_seq": weight_decay * l_bar, "max_abs_diff": diff, "max_abs_update": moved,
          "holds": bool(diff <= tol * (1.0 + scale) and moved > 100 * diff)}


def check_stationarity(run: SGDRun, tokens: np.ndarray, mask: np.ndarray,
                       rel_tol: float = 0.05, growth_tol: float = 0.05,
                       num_checkpoints: int = 8, with_sharpness: bool = True
                       ) -> dict[str, Any]:
  """Definition 3.1 (1)-(2) along SGD + L2 (Lemma 4.1's premise), full batch.

  Reports ||theta_t|| and the residual ||grad L(theta_t) + lam m theta_t|| at log-spaced
  checkpoints. A finite run cannot show a limit; the readings are:
  bounded: max_t ||theta_t|| over the second half of the run <= (1 + growth_tol) x the
  max over the first half (the norm is not still growing);
  vanishing: residual at the end <= rel_tol x residual at theta_0.
  holds: both. With `with_sharpness` also the top Hessian eigenvalue of L_lambda at the
  end (power iteration), against 2 / eta_T: gradient descent at rate eta cannot settle
  in a minimum sharper than 2 / eta (it oscillates instead: the "edge of stability").
  """
  if run.polish_iters:
    raise ValueError("check_stationarity is about the descent: pass a run before `polish`")
  pts = [0] + [int(round(x)) for x in np.geomspace(1, run.steps, num_checkpoints)]
  pts = sorted(set(pts) | {run.steps})
  half = run.steps // 2
  first = float(run.param_norm[:half + 1].max())
  second = float(run.param_norm[half:].max())
  r0, rT = float(run.residual[0]), float(run.residual[-1])
  tail = run.residual[-max(1, run.steps // 10):]
  out = {
      "lam": run.lam, "lr": run.lr, "tau": run.tau, "decay": run.decay, "steps": run.steps,
      "checkpoints": [{"step": t, "loss": float(run.loss[t]), "param_norm": float(run.param_norm[t]),
                       "residual": float(run.residual[t])} for t in pts],
      "max_param_norm": float(run.param_norm.max()), "param_norm_final": float(run.param_norm[-1]),
      "max_norm_first_half": first, "max_norm_second_half": second,
      "residual_initial": r0, "residual_final": rT, "residual_ratio": rT / r0,
      "residual_min_last_10pct": float(tail.min()),
      "residual_median_last_10pct": float(np.median(tail)),
      "bounded": bool(second <= (1.0 + growth_tol) * first),
      "vanishing": bool(rT <= rel_tol * r0),
  }
  if with_sharpness:
    out["sharpness_final"] = sharpness(run.model, run.params, tokens, mask, run.lam, run.decay)
    out["two_over_lr_final"] = 2.0 / run.lr_at(run.steps)
  out["holds"] = bool(out["bounded"] and out["vanishing"])
  return out


def check_theorem_5_5(run: SGDRun, lang: EnumerableLanguage, emp: EnumeratedEmpirical,
                      tokens: np.ndarray, mask: np.ndarray,
                      dist: ExactDistribution | None = None, stationary_tol: float = 1e-2
                      ) -> dict[str, Any]:
  """Theorem 5.5 (eq. 60, 44): P_theta*(S_0) >= 1 - eps with eps = delta = lam M.

  Reading. lam is eq. 3's (per-sequence loss). M is the bound of eq. 33,
  ||theta*|| <= M; the smallest admissible M, M = ||theta*||, gives the theorem's
  sharpest statement and is the one `holds` tests (all parameters: the paper's
  ||theta||^2 has no decay mask). Also reported: M' = max_t ||theta_t|| over the
  trajectory (eq. 9-10, the largest M the proof mentions: a weaker bound,
  `holds_sup_norm`), and delta_measured = ||grad L(theta_T)||, the quantity eq. 33
  bounds (= lam ||theta*|| exactly at a stationary point). The theorem assumes theta* is
  stationary; `residual` = ||grad L + lam theta|| says how far the run's end is from it
  (`relative_residual`: over ||grad L||; pass a `polish`ed run); `stationary` when it is
  <= stationary_tol (float32 limits how far L-BFGS gets: at small lambda it can stall
  with a relative residual of 0.3-0.8, and such a point does not test the theorem). The mode-collapse set of
  Definition 3.2 at the same eps is reported with K = |S_0| for comparison (the theorem
  says S_0 itself, |S| = K, carries 1 - eps).
  """
  dist = exact_model_distribution(run.model, run.params, lang) if dist is None else dist
  s = stationarity(run.model, run.params, tokens, mask, run.lam, run.decay)
  mass = support_mass(dist, emp)
  eps = run.lam * s["param_norm"]
  eps_sup = run.lam * float(run.param_norm.max())
  out = {"lam": run.lam, "support_size": emp.support_size, "num_sequences": lang.num_sequences,
         "support_mass": mass, "mass_outside_language": dist.mass_outside,
         "forward_kl": forward_kl(dist, emp), "model_entropy": model_entropy(dist),
         "M": s["param_norm"], "eps": eps, "bound": 1.0 - eps,
         "M_sup": float(run.param_norm.max()), "eps_sup": eps_sup, "bound_sup": 1.0 - eps_sup,
         "delta_measured": s["grad_norm"], "residual": s["residual"],
         "relative_residual": s["residual"] / max(s["grad_norm"], 1e-30),
         "stationary": bool(s["residual"] <= stationary_tol * s["grad_norm"]),
         "bound_from_delta": 1.0 - s["grad_norm"],
         "vacuous": bool(eps >= 1.0), "holds": bool(mass >= 1.0 - eps),
         "holds_sup_norm": bool(mass >= 1.0 - eps_sup)}
  if 0.0 < eps < 1.0:
    mc = mode_collapse_set(dist, eps)
    out.update(collapse_set_exists=mc.exists, collapse_set_size=mc.size,
               collapse_set_fraction=mc.fraction)
  return out


def fit_exponent(x: np.ndarray, y: np.ndarray) -> tuple[float, float, np.ndarray]:
  """y ~ c x^p by least squares in log-log: (p, c, local slopes between neighbours in x)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  order = np.argsort(x)
  x, y = np.log(x[order]), np.log(y[order])
  slope, intercept = np.polyfit(x, y, 1)
  return float(slope), float(math.exp(intercept)), np.diff(y) / np.diff(x)


def check_kl_order(runs: Sequence[SGDRun], lang: EnumerableLanguage, emp: EnumeratedEmpirical,
                   tokens: np.ndarray, mask: np.ndarray, min_exponent: float = 0.75
                   ) -> dict[str, Any]:
  """Order in lambda of d(P_emp || P_theta*) - inf_theta d(P_emp || P_theta): eq. 37 vs eq. 39.

  Eq. 37 bounds the gap by delta^2 / (2 beta) = O(lambda^2) (with delta = lambda M);
  eq. 38-39 relax it to O(lambda). Fitted: the least-squares slope p of log KL against
  log lambda over the runs (one per lambda). Since inf KL >= 0 is unknown, the slope of
  log KL is a lower bound on the gap's exponent (KL = I + c lambda^p has log-slope
  p c lambda^p / (I + c lambda^p) <= p); with a finite training set and a model that can
  approach P_emp (Assumption 5.4), I = 0 and the slope is the exponent itself.
  holds: p >= min_exponent (the KL falls at least about linearly: eq. 39's order);
  `consistent_with_eq37`: p >= 2 - (1 - min_exponent). Each run's relative residual
  ||grad L_lambda|| / ||grad L|| (on the training rows tokens, mask) says how stationary
  its point is; `max_relative_residual` is the worst.
  """
  lams = np.array([r.lam for r in runs], np.float64)
  kls, rows = [], []
  for r in runs:
    dist = exact_model_distribution(r.model, r.params, lang)
    kl = forward_kl(dist, emp)
    kls.append(kl)
    st = stationarity(r.model, r.params, tokens, mask, r.lam, r.decay)
    rows.append({"lam": r.lam, "forward_kl": kl, "support_mass": support_mass(dist, emp),
                 "param_norm": st["param_norm"], "residual": st["residual"],
                 "relative_residual": st["residual"] / max(st["grad_norm"], 1e-30)})
  kls = np.asarray(kls)
  order = np.argsort(lams)
  lams, kls = lams[order], kls[order]
  rows = [rows[i] for i in order]
  slope, prefactor, local = fit_exponent(lams, kls)
  return {"runs": rows, "exponent": slope, "prefactor": prefactor,
          "max_relative_residual": max(r["relative_residual"] for r in rows),
          "local_exponents": [float(x) for x in local],
          "consistent_with_eq39": bool(slope >= min_exponent),
          "consistent_with_eq37": bool(slope >= 2.0 - (1.0 - min_exponent)),
          "holds": bool(slope >= min_exponent)}


def check_lemma_4_3(run: SGDRun, lang: EnumerableLanguage, emp: EnumeratedEmpirical,
                    tokens: np.ndarray, mask: np.ndarray, kl_reference: float,
                    dist: ExactDistribution | None = None, with_beta: bool = True,
                    stationary_tol: float = 1e-2) -> dict[str, Any]:
  r"""Lemma 4.3 (eq. 39) at one theta*, read as eq. 48: KL(theta*) <= inf KL + lam ||theta*||.

  Eq. 39 says O(lambda); the constant the proof uses downstream (eq. 44, 48) is
  eps = delta = lam M with M = ||theta*|| (eq. 33), so that is the tested inequality;
  eq. 37's own constant, delta^2 / (2 beta), is also reported, with beta the largest
  Hessian eigenvalue of L (not L_lambda) at theta* by power iteration (a local beta:
  the global smoothness constant is at least as large, so a violation of eq. 37 with
  the local beta is a violation with any admissible beta).

  inf_theta d(P_emp || P_theta) is unknown, but 0 <= inf <= `kl_reference`, the KL at
  any parameters (the caller passes the smallest it measured). So: `violated` (certain)
  when KL(theta*) - kl_reference > eps; `certain` (holds for sure) when KL <= eps;
  otherwise undetermined. `holds`: not violated. `gap_over_lam`: (KL - kl_reference) /
  lam, the O(lambda) constant this point needs (a lower bound on it when inf <
  kl_reference). The lemma assumes theta* stationary: `relative_residual` and
  `stationary` as in `check_theorem_5_5`; at a point that is not, a violation says
  nothing about the lemma.
  """
  dist = exact_model_distribution(run.model, run.params, lang) if dist is None else dist
  s = stationarity(run.model, run.params, tokens, mask, run.lam, run.decay)
  kl = forward_kl(dist, emp)
  eps = run.lam * s["param_norm"]
  out = {"lam": run.lam, "forward_kl": kl, "kl_reference": float(kl_reference),
         "gap_upper": kl, "gap_lower": kl - float(kl_reference), "M": s["param_norm"],
         "eps": eps, "gap_over_lam": (kl - float(kl_reference)) / run.lam,
         "relative_residual": s["residual"] / max(s["grad_norm"], 1e-30),
         "stationary": bool(s["residual"] <= stationary_tol * s["grad_norm"]),
         "violated": bool(kl - kl_reference > eps), "certain": bool(kl <= eps)}
  if with_beta:
    beta = abs(sharpness(run.model, run.params, tokens, mask, 0.0, run.decay))
    out.update(beta=beta, eq37_bound=eps ** 2 / (2.0 * beta),
               eq37_violated=bool(kl - kl_reference > eps ** 2 / (2.0 * beta)))
  out["holds"] = not out["violated"]
  return out


# ----------------------------------------------------------------------- DMU (appendix B.3)
#
# The DMU's updates under its own masks (stabjax/models/dmu.py), one SGD step
# Delta theta = -lr grad_theta L(theta; masks), over many independent mask draws. The
# loss is linear in the unit's output, L = sum(r * y), so the gradient of the output
# bias is r itself times its mask: the setting of the paper's eq. 78 / 85 (a fixed
# gradient, masked). Every mode runs through `dmu_dense_reference`, the unit's own
# computation for three modes and equal to `dfix`'s gathered one (tests/test_dmu.py).


def identity(a):
  return a


def dmu_unit_params(key: jax.Array, d: int, d_ff: int, scale: float = 1.0
                    ) -> dict[str, jax.Array]:
  """Random DMU parameters (normal, std scale / sqrt(fan in); biases too)."""
  k = jax.random.split(key, 4)
  return {"wi_kernel": scale * jax.random.normal(k[0], (d, d_ff)) / math.sqrt(d),
          "wi_bias": scale * jax.random.normal(k[1], (d_ff,)),
          "wo_kernel": scale * jax.random.normal(k[2], (d_ff, d)) / math.sqrt(d_ff),
          "wo_bias": scale * jax.random.normal(k[3], (d,))}


@functools.partial(jax.jit, static_argnames=("config", "activation"))
def _dmu_update_sums(config, params, x, r, keys, activation):
  """Over the draws `keys`: sum, sum of squares and non-zero count of -grad L(theta; masks),
  and the sum of the unit's outputs."""
  d, d_ff = params["wi_kernel"].shape
  scales = dmu_lib.dmu_scales(config, d, d_ff, deterministic=False)

  def update(key):
    masks = dmu_lib.dmu_masks(key, config, d, d_ff)
    y, vjp = jax.vjp(lambda p: dmu_lib.dmu_dense_reference(p, x, masks, scales, activation),
                     params)
    return jax.tree.map(lambda g: -g, vjp(r)[0]), y

  ups, ys = jax.vmap(update)(keys)
  sums = {n: (v.sum(0), (v * v).sum(0), (v != 0).sum(0)) for n, v in ups.items()}
  return sums, ys.sum(0)


@dataclasses.dataclass(frozen=True)
class UpdateMoments:
  """Per-entry moments of a DMU's SGD update over mask draws (`dmu_update_moments`).

  Attributes (dicts keyed by the DMU's param names, float64 arrays of the param shapes):
    mean, var: Monte Carlo mean and (unbiased) variance of Delta theta = -lr grad.
    output_mean: the Monte Carlo mean of the unit's output (masked, training scaling).
    keep: share of the draws in which the entry's update is non-zero (it took part).
    grad: the gradient of the unmasked unit (c~ = 1): the paper's grad(w_ij L).
    num_masks: draws.
  """

  mean: dict
  var: dict
  keep: dict
  grad: dict
  output_mean: np.ndarray
  num_masks: int


def dmu_update_moments(config, params: dict, x: jax.Array, r: jax.Array, key: jax.Array,
                       num_masks: int, activation: Callable = identity, lr: float = 1.0,
                       chunk: int = 1000) -> UpdateMoments:
  """Mean, variance and keep share of -lr grad L(theta; masks), L = sum(r * unit(x)).

  `num_masks` independent draws of `dmu_masks` (keys split from `key`), in vmapped
  chunks; sums accumulated in float64.
  """
  keys = jax.random.split(key, num_masks)
  tot, y_sum = None, 0.0
  for start in range(0, num_masks, chunk):
    part = keys[start:start + chunk]
    sums, ys = _dmu_update_sums(config, params, x, r, part, activation)
    y_sum = y_sum + np.asarray(ys, np.float64)
    sums = {n: tuple(np.asarray(a, np.float64) for a in v) for n, v in sums.items()}
    tot = sums if tot is None else {n: tuple(a + b for a, b in zip(tot[n], sums[n]))
                                    for n in tot}
  n = float(num_masks)
  mean = {k: s / n for k, (s, _, _) in tot.items()}
  var = {k: (q - n * mean[k] ** 2) / (n - 1) for k, (_, q, _) in tot.items()}
  keep = {k: c / n for k, (_, _, c) in tot.items()}
  grad = jax.grad(lambda p: jnp.sum(r * dmu_lib.mlp(p, x, activation)))(params)
  return UpdateMoments(mean={k: lr * v for k, v in mean.items()},
                       var={k: lr * lr * v for k, v in var.items()}, keep=keep,
                       grad={k: np.asarray(v, np.float64) for k, v in grad.items()},
                       output_mean=y_sum / n, num_masks=num_masks)


def _bernoulli_var_se(g2: np.ndarray, p: float, num: int) -> float:
  """Standard error of sum_i s_i^2 / sum_i g_i^2, s_i^2 the sample variance of -M_i g_i.

  M_i ~ Bernoulli(p): Var(s^2) ~ (mu_4 - sigma^4) / num with mu_4 = g^4 p(1-p)(1-3p+3p^2).
  """
  mu4 = p * (1 - p) * (1 - 3 * p + 3 * p * p)
  return float(math.sqrt(np.sum(g2 ** 2) * (mu4 - (p * (1 - p)) ** 2) / num) / np.sum(g2))


def check_lemma_b2(key: jax.Array, widths: Sequence[int] = (8, 32, 128, 512),
                   c_tilde: float = 0.3, pair: tuple[str, str] = ("dmu2_prob", "dmu2_fix"),
                   num_masks: int = 10_000, d_ff: int = 1, z: float = 4.0,
                   shrink: float = 10.0) -> dict[str, Any]:
  r"""Lemma B.2: (1/n) sum_i |Var(b_i | Prob) - Var(b_i | Fix)| -> 0 as n -> infinity.

  b is the DMU's output bias (n = d entries; d_ff small, it plays no part), one SGD
  step of a loss linear in the output, so Delta b_i = -lr M_i g_i with g_i = dL/db_i
  fixed (eq. 85). Monte Carlo over `num_masks` draws of the unit's masks in each mode
  of `pair` (edge: dmu2_prob / dmu2_fix; node: dprob / dfix, whose bias mask is the
  output-node mask). Reading: Var is the variance over the mask draw (the marginal
  one). Then Var(b_i | Prob) = lr^2 c~(1-c~) g_i^2 (eq. 95) and, since a uniform
  floor(c~ n)-subset keeps each entry with p = floor(c~ n) / n (eq. 87),
  Var(b_i | Fix) = lr^2 p(1-p) g_i^2: their normalised difference |c~(1-c~) - p(1-p)|
  vanishes like 1/n. (The proof's own reading, eq. 97, "Var(W | S_W) = 0" for Fix,
  conditions on the subset; it makes the difference c~(1-c~) mean g^2, which does not
  vanish: reported as `proof_reading_difference`.) Everything is normalised by mean g^2.

  holds: at every width each mode's measured variance is within z standard errors of
  its formula, the measured signed difference within z SE of the formula's, and the
  formula's difference at the largest width is below 1/shrink of that at the smallest.
  """
  rows = []
  lr = 1.0
  for i, n in enumerate(widths):
    k_p, k_x, k_r, k_m = jax.random.split(jax.random.fold_in(key, i), 4)
    params = dmu_unit_params(k_p, n, d_ff)
    x = jax.random.normal(k_x, (4, n))
    r = jax.random.normal(k_r, (4, n))
    row = {"n": n}
    meas, se = {}, {}
    for j, mode in enumerate(pair):
      cfg = configs.DMUConfig(c_tilde=c_tilde, mode=mode)
      m = dmu_update_moments(cfg, params, x, r, jax.random.fold_in(k_m, j), num_masks, lr=lr)
      g2 = m.grad["wo_bias"] ** 2
      p = dmu_lib.keep_probs(cfg, n, d_ff)["wo_bias" if mode in dmu_lib.EDGE_MODES else "output"]
      meas[mode] = float(m.var["wo_bias"].sum() / (lr ** 2 * g2.sum()))
      se[mode] = _bernoulli_var_se(g2, p, num_masks)
      row[mode] = {"keep_prob": p, "var_measured": meas[mode], "var_formula": p * (1 - p),
                   "se": se[mode], "keep_measured": float(m.keep["wo_bias"].mean()),
                   "mean_measured": float(np.sum(-m.mean["wo_bias"] * m.grad["wo_bias"])
                                          / (lr * g2.sum()))}
      row[mode]["z"] = (meas[mode] - p * (1 - p)) / se[mode]
      row[mode]["_var"] = m.var["wo_bias"] / (lr ** 2 * g2.mean())
    a, b = pair
    row["difference_formula"] = row[a]["var_formula"] - row[b]["var_formula"]
    row["difference_measured"] = meas[a] - meas[b]
    row["difference_se"] = math.hypot(se[a], se[b])
    row["difference_z"] = ((row["difference_measured"] - row["difference_formula"])
                           / row["difference_se"])
    # (1/n) sum |.| of the per-entry Monte Carlo variances: floored by their noise.
    row["abs_difference_measured"] = float(np.mean(np.abs(row[a].pop("_var")
                                                          - row[b].pop("_var"))))
    row["proof_reading_difference"] = c_tilde * (1 - c_tilde)
    rows.append(row)
  agree = all(abs(r_[m]["z"]) <= z for r_ in rows for m in pair)
  diff_ok = all(abs(r_["difference_z"]) <= z for r_ in rows)
  first, last = abs(rows[0]["difference_formula"]), abs(rows[-1]["difference_formula"])
  return {"pair": list(pair), "c_tilde": c_tilde, "num_masks": num_masks, "widths": rows,
          "formulas_agree": bool(agree), "differences_agree": bool(diff_ok),
          "vanishes": bool(last <= first / shrink),
          "holds": bool(agree and diff_ok and last <= first / shrink)}


def check_node_edge_equivalence(key: jax.Array, widths: Sequence[tuple[int, int]] = ((8, 16),
                                                                                   (64, 128)),
                                c_tilde: float = 0.5, num_masks: int = 4000,
                                modes: Sequence[str] = ("dmu2_prob", "dmu2_fix", "dprob", "dfix"),
                                rel_tol: float = 0.1) -> dict[str, Any]:
  r"""Lemma B.4 / Theorem B.5: node modes (dprob/dfix) = edge modes (dmu2_prob/dmu2_fix).

  The claim: in expectation and normalised variance, for the parameter updates and the
  output, asymptotically in the widths; the unit is linear (identity activation, the
  lemma's "linear MLP with no softmax"). The paper's proof (eq. 111) gives a node-mode
  weight the mask of its input node only, keep probability c~ as in the edge modes.
  Under Alg. 3/4 as written (and as implemented, `dmu_param_masks`) the output node is
  masked too, so a kernel entry takes part iff both its nodes are kept: c~^2. Measured
  per mode and parameter, over `num_masks` draws, at each (d, d_ff) of `widths`:
  `keep` (share of draws in which the entry's update is non-zero), `mean_ratio`
  sum E[Delta] (-g) / sum g^2 and `var_ratio` sum Var[Delta] / sum g^2 (g: the
  unmasked unit's gradient; the paper's single-layer formulas are c~ and c~(1-c~)), and
  the output's expectation E[y] (`output_ratio`: <E[y], y_full> / |y_full|^2).
  Compared: each node mode against its edge counterpart (dprob vs dmu2_prob, dfix vs
  dmu2_fix): `node_over_edge` = node / edge of each quantity.

  holds: every node/edge ratio of keep, mean and variance is within rel_tol of 1 at the
  largest width (the asymptotic claim).
  """
  out_rows = []
  for i, (d, d_ff) in enumerate(widths):
    k_p, k_x, k_r, k_m = jax.random.split(jax.random.fold_in(key, i), 4)
    params = dmu_unit_params(k_p, d, d_ff)
    x = jax.random.normal(k_x, (4, d))
    r = jax.random.normal(k_r, (4, d))
    full = np.asarray(dmu_lib.mlp(params, x, identity), np.float64)
    per_mode = {}
    for j, mode in enumerate(modes):
      cfg = configs.DMUConfig(c_tilde=c_tilde, mode=mode)
      m = dmu_update_moments(cfg, params, x, r, jax.random.fold_in(k_m, j), num_masks)
      q = {}
      for name in dmu_lib.PARAM_NAMES:
        g = m.grad[name]
        q[name] = {"keep": float(m.keep[name].mean()),
                   "mean_ratio": float(np.sum(-m.mean[name] * g) / np.sum(g * g)),
                   "var_ratio": float(m.var[name].sum() / np.sum(g * g))}
      q["output_ratio"] = float(np.sum(m.output_mean * full) / np.sum(full * full))
      per_mode[mode] = q
    ratios = {}
    for node, edge in (("dprob", "dmu2_prob"), ("dfix", "dmu2_fix")):
      if node in per_mode and edge in per_mode:
        ratios[f"{node}/{edge}"] = {
            name: {k: per_mode[node][name][k] / per_mode[edge][name][k]
                   for k in ("keep", "mean_ratio", "var_ratio")}
            for name in dmu_lib.PARAM_NAMES}
        ratios[f"{node}/{edge}"]["output_ratio"] = (per_mode[node]["output_ratio"]
                                                    / per_mode[edge]["output_ratio"])
    out_rows.append({"d": d, "d_ff": d_ff, "modes": per_mode, "node_over_edge": ratios})
  last = out_rows[-1]["node_over_edge"]
  worst = max(abs(v - 1.0) for pair_ in last.values() for name, qs in pair_.items()
              if name != "output_ratio" for v in qs.values())
  return {"c_tilde": c_tilde, "num_masks": num_masks, "widths": out_rows,
          "worst_relative_gap": float(worst), "holds": bool(worst <= rel_tol)}


def hoeffding_epsilon(k: int, delta: float, width: float = 1.0) -> float:
  """Eq. 129/130: (b - a) sqrt(ln(2 / delta) / (2 K))."""
  return width * math.sqrt(math.log(2.0 / delta) / (2.0 * k))


@functools.partial(jax.jit, static_argnames=("config",))
def _dmu_bounded_losses(config, params, x, targets, keys):
  """l(omega) = mean over rows of 1 - softmax(DMU(x; omega))[target], in [0, 1], per key."""
  from stabjax.models.dmu import DMU
  module = DMU(params["wi_kernel"].shape[1], config)

  def loss(key):
    y = module.apply({"params": params}, x, deterministic=False, rngs={"dmu": key})
    p = jax.nn.softmax(y, axis=-1)
    return 1.0 - jnp.mean(jnp.take_along_axis(p, targets[:, None], axis=-1))

  return jax.vmap(loss)(keys)


def check_theorem_b7(key: jax.Array, ks: Sequence[int] = (1, 4, 16, 64),
                     deltas: Sequence[float] = (0.05, 0.2), groups: int = 1000,
                     reference: int = 50_000, c_tilde: float = 0.5, mode: str = "dfix",
                     d: int = 16, d_ff: int = 64, z: float = 3.0, rate_tol: float = 0.15
                     ) -> dict[str, Any]:
  r"""Theorem B.7 as empirical coverage: |L_K - L| <= (b - a) sqrt(ln(2/delta) / 2K) w.p. >= 1 - delta.

  The learner: one DMU unit (the project's `DMU` module, `mode`, c~, its own 'dmu'
  stream; gelu), random parameters (std 1 / sqrt(fan in), scaled up 3x so the output
  moves with the mask), a fixed batch of 8 rows and targets; the loss of one
  stochastic pass omega is l = mean_rows (1 - softmax(y)[target]), bounded in
  [a, b] = [0, 1] by construction. L = E_omega l is estimated from `reference`
  independent passes (its standard error is reported and is far below every epsilon).
  For each K and delta, `groups` independent groups of K passes: coverage = share of
  groups with |mean - L| <= epsilon(K, delta). holds: coverage >= 1 - delta - z SE
  (SE = sqrt(delta (1 - delta) / groups)) for every (K, delta). Also reported: the
  (1 - delta)-quantile of |mean - L| over epsilon (how loose the bound is) and the
  coverage with [a, b] the observed range of l (min, max over the passes), a tighter
  bound that is still valid when the support is reached.

  The bound is loose (Hoeffding ignores the variance), so coverage alone would not see
  e.g. passes that share masks; the text's rate claim ("the variance induced by the
  random masks vanishes at rate O(K^-1/2)") is checked too: `rate` = std of the K-pass
  mean x sqrt(K) / std of one pass, 1 for i.i.d. passes; holds also needs
  |rate - 1| <= rate_tol at every K.
  """
  cfg = configs.DMUConfig(c_tilde=c_tilde, mode=mode)
  k_p, k_x, k_t, k_ref, k_g = jax.random.split(key, 5)
  x = jax.random.normal(k_x, (8, d))
  params = dmu_unit_params(k_p, d, d_ff, scale=3.0)  # the DMU module's param names
  targets = jax.random.randint(k_t, (8,), 0, d)

  def losses(k, num, chunk=20_000):
    keys = jax.random.split(k, num)
    return np.concatenate([np.asarray(_dmu_bounded_losses(cfg, params, x, targets,
                                                          keys[s:s + chunk]), np.float64)
                           for s in range(0, num, chunk)])

  ref = losses(k_ref, reference)
  big_l, ref_se = float(ref.mean()), float(ref.std() / math.sqrt(reference))
  lo, hi = float(ref.min()), float(ref.max())
  rows = []
  rates = []
  for i, k in enumerate(ks):
    means = losses(jax.random.fold_in(k_g, i), k * groups).reshape(groups, k).mean(1)
    dev = np.abs(means - big_l)
    rate = float(np.sqrt(np.mean((means - big_l) ** 2) * k) / ref.std())
    rates.append({"K": k, "rate": rate, "holds": bool(abs(rate - 1.0) <= rate_tol)})
    for delta in deltas:
      eps = hoeffding_epsilon(k, delta)
      eps_obs = hoeffding_epsilon(k, delta, hi - lo)
      se = math.sqrt(delta * (1 - delta) / groups)
      cov = float((dev <= eps).mean())
      rows.append({"K": k, "delta": delta, "epsilon": eps, "coverage": cov,
                   "promised": 1.0 - delta, "se": se,
                   "quantile_over_epsilon": float(np.quantile(dev, 1.0 - delta) / eps),
                   "epsilon_observed_range": eps_obs,
                   "coverage_observed_range": float((dev <= eps_obs).mean()),
                   "holds": bool(cov >= 1.0 - delta - z * se)})
  return {"mode": mode, "c_tilde": c_tilde, "groups": groups, "reference": reference,
          "L": big_l, "L_se": ref_se, "loss_std": float(ref.std()), "loss_min": lo,
          "loss_max": hi, "rows": rows, "rates": rates, "min_coverage_margin": float(min(
              r["coverage"] - r["promised"] for r in rows)),
          "coverage_holds": bool(all(r["holds"] for r in rows)),
          "rate_holds": bool(all(r["holds"] for r in rates)),
          "holds": bool(all(r["holds"] for r in rows) and all(r["holds"] for r in rates))}


# ------------------------------------------------------------------------ DTU (Theorem B.9)


def _spectral(a) -> float:
  return float(np.linalg.norm(np.asarray(a, np.float64), 2))


def check_theorem_b9(key: jax.Array, t: int = 16, d: int = 16, dk: int = 8, keep: int = 4,
                     radius: float = 0.5, num_points: int = 8, num_pairs: int = 256,
                     power_iters: int = 30, segment_points: int = 129,
                     bisect_steps: int = 40, c_soft: float = 1.0) -> dict[str, Any]:
  r"""Theorem B.9: DTU attention A(X) is Lipschitz in X; and what a set flip does.

  One head of the project's DTU attention (`dtu.sampled_attention`, causal, key-norm
  scores, `keep` = a3 of n = t keys per query), A(X) = softmax(Q_I K_I^T / sqrt(dk)) V_I
  with Q, K, V = X W_Q, X W_K, X W_V (W std 1/sqrt(d)), X [t, d] standard normal, fixed
  'dtu' key. Reading of the norms (the proof's eq. 150-152 work with either): matrix
  bounds B_Q, B_K, B_V, B_X are spectral norms, differences ||A(X1) - A(X2)|| and
  ||X1 - X2|| Frobenius; B_X = the largest ||X||_2 on the ball ||X - X0||_F <= radius
  ||X0||_F where the constants are measured (bounded by ||X0||_2 + radius ||X0||_F).

  Frozen key sets (the log scores of X0 fixed: `log_scores` passed): the measured
  constant `L_frozen` is the largest of (i) the Jacobian's spectral norm (power
  iteration, jvp/vjp) at X0 and at num_points - 1 random points of the ball and (ii)
  ||A(X1) - A(X2)|| / ||X1 - X2|| over num_pairs random pairs in the ball. Against:
  eq. 153's constant for attention over fixed sets, B_V + B_X B_V (2 B_X B_Q B_K) / sqrt(dk)
  (`bound_eq153`), and the theorem's DTU constant eq. 155,
  a_V B_V (1 + (2 C_soft + B_X^2 a_Q a_K B_Q B_K) / sqrt(dk)) with a_V = a_Q = a_K =
  a3 / n (eq. 154) and C_soft (undefined in the paper: "softmax normalization
  constants") = `c_soft` (1: the softmax Lipschitz constant of eq. 145);
  `c_soft_needed` is the smallest C_soft for which eq. 155 covers L_frozen.

  Re-drawn sets (the scores recomputed from X, as a training call does): along a
  segment from X0 to a point of the ball's boundary, the first change of a set between
  neighbouring points is bisected `bisect_steps` times; `flip_jump` = ||A(X_b) -
  A(X_a)||, `flip_gap` = ||X_b - X_a||, `flip_ratio` their quotient, vs the frozen
  quotient on the same pair.
  holds_frozen: L_frozen <= bound_eq153; holds_eq155: L_frozen <= eq. 155's constant;
  holds_redrawn: flip_ratio <= bound_eq153 (Lipschitz with the sets re-drawn).
  """
  from stabjax.configs import DTUConfig
  from stabjax.models import dtu as dtu_lib
  k_w, k_x, k_pts, k_pairs, k_seg, k_rng = jax.random.split(key, 6)
  wq, wk, wv = (jax.random.normal(k, (d, dk)) / math.sqrt(d) for k in jax.random.split(k_w, 3))
  x0 = jax.random.normal(k_x, (t, d))
  cfg = DTUConfig(keep=keep, block_q=t)

  def qkv(x):
    return tuple((x @ w)[None, :, None, :] for w in (wq, wk, wv))  # [1, t, 1, dk]

  def attend(x, log_scores, sets=False):
    q, k, v = qkv(x)
    ls = dtu_lib.dtu_log_scores(k, "key_norm") if log_scores is None else log_scores
    out, idx, valid = dtu_lib.sampled_attention(k_rng, q, k, v, cfg, True, None,
                                                return_sets=sets, log_scores=ls)
    return (out[0, :, 0], idx, valid) if sets else out[0, :, 0]

  scores_at = jax.jit(lambda x: dtu_lib.dtu_log_scores(qkv(x)[1], "key_norm"))
  ls0 = scores_at(x0)
  attend_with = jax.jit(attend)  # frozen: the scores passed in
  frozen = lambda x: attend(x, ls0)
  redrawn = jax.jit(lambda x: attend(x, None))

  @jax.jit
  def sets_at(x):  # each query's set, sorted, -1 in unused slots (slot order is immaterial)
    _, idx, valid = attend(x, None, sets=True)
    return jnp.sort(jnp.where(valid, idx, -1), axis=-1)

  r0 = radius * float(jnp.linalg.norm(x0))

  def ball_point(k):
    u = jax.random.normal(k, x0.shape)
    s = jax.random.uniform(jax.random.fold_in(k, 1)) ** (1.0 / x0.size)
    return x0 + r0 * s * u / jnp.linalg.norm(u)

  @jax.jit
  def jac_norm(x, v0):
    def body(v, _):
      _, jv = jax.jvp(frozen, (x,), (v,))
      _, vjp = jax.vjp(frozen, x)
      w = vjp(jv)[0]
      return w / jnp.linalg.norm(w), None
    v, _ = jax.lax.scan(body, v0 / jnp.linalg.norm(v0), None, length=power_iters)
    return jnp.linalg.norm(jax.jvp(frozen, (x,), (v,))[1])

  pts = [x0] + [ball_point(k) for k in jax.random.split(k_pts, num_points - 1)]
  jac = [float(jac_norm(p, jax.random.normal(jax.random.fold_in(k_pts, i), x0.shape)))
         for i, p in enumerate(pts)]
  pair_keys = jax.random.split(k_pairs, 2 * num_pairs)
  a = jax.vmap(ball_point)(pair_keys[:num_pairs])
  b = jax.vmap(ball_point)(pair_keys[num_pairs:])
  fa, fb = jax.jit(jax.vmap(frozen))(a), jax.jit(jax.vmap(frozen))(b)
  ratios = (jnp.linalg.norm((fa - fb).reshape(num_pairs, -1), axis=-1)
            / jnp.linalg.norm((a - b).reshape(num_pairs, -1), axis=-1))
  l_frozen = max(max(jac), float(ratios.max()))

  b_q, b_k, b_v = _spectral(wq), _spectral(wk), _spectral(wv)
  b_x = max([_spectral(p) for p in pts] + [_spectral(p) for p in np.asarray(a)]
            + [_spectral(p) for p in np.asarray(b)])
  b_x_bound = _spectral(x0) + r0
  bound153 = b_v + b_x * b_v * (2.0 * b_x * b_q * b_k) / math.sqrt(dk)
  frac = keep / t
  l155 = lambda c: frac * b_v * (1.0 + (2.0 * c + b_x ** 2 * frac * frac * b_q * b_k)
                                 / math.sqrt(dk))
  c_needed = max(0.0, ((l_frozen / (frac * b_v) - 1.0) * math.sqrt(dk)
                       - b_x ** 2 * frac * frac * b_q * b_k) / 2.0)

  # A set flip along a segment, with the sets re-drawn at every point.
  u = jax.random.normal(k_seg, x0.shape)
  end = x0 + r0 * u / jnp.linalg.norm(u)
  seg = lambda s: x0 + s * (end - x0)
  same = lambda s1, s2: np.array_equal(np.asarray(sets_at(seg(s1))),
                                       np.asarray(sets_at(seg(s2))))
  grid = np.linspace(0.0, 1.0, segment_points)
  flip = None
  for lo_s, hi_s in zip(grid[:-1], grid[1:]):
    if not same(lo_s, hi_s):
      flip = (float(lo_s), float(hi_s))
      break
  out = {"t": t, "d": d, "dk": dk, "keep": keep, "radius": radius, "jacobian_norms": jac,
         "max_pair_ratio": float(ratios.max()), "L_frozen": l_frozen, "B_Q": b_q, "B_K": b_k,
         "B_V": b_v, "B_X": b_x, "B_X_bound": b_x_bound, "bound_eq153": bound153,
         "c_soft": c_soft, "bound_eq155": l155(c_soft), "bound_eq155_c0": l155(0.0),
         "c_soft_needed": c_needed, "holds_frozen": bool(l_frozen <= bound153),
         "holds_eq155": bool(l_frozen <= l155(c_soft))}
  if flip is None:
    out.update(flip_found=False, holds_redrawn=True)
    return out
  lo_s, hi_s = flip
  for _ in range(bisect_steps):
    mid = 0.5 * (lo_s + hi_s)
    if same(lo_s, mid):
      lo_s = mid
    else:
      hi_s = mid
  xa, xb = seg(lo_s), seg(hi_s)
  gap = float(jnp.linalg.norm(xb - xa))
  jump = float(jnp.linalg.norm(redrawn(xb) - redrawn(xa)))
  ls_a = scores_at(xa)
  frozen_jump = float(jnp.linalg.norm(attend_with(xb, ls_a) - attend_with(xa, ls_a)))
  changed = int(np.sum(np.any(np.asarray(sets_at(xa)) != np.asarray(sets_at(xb)), axis=-1)))
  out.update(flip_found=True, flip_at=[lo_s, hi_s], flip_gap=gap, flip_jump=jump,
             flip_ratio=jump / max(gap, 1e-30), frozen_jump_same_pair=frozen_jump,
             frozen_ratio_same_pair=frozen_jump / max(gap, 1e-30),
             flip_changed_queries=changed, holds_redrawn=bool(jump / max(gap, 1e-30) <= bound153))
  return out


# ------------------------------------------------------------------------ PSU (Theorem B.1)


def check_theorem_b1(records: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
                     alpha: float, tail: int = 1000, one_tol: float = 0.1) -> dict[str, Any]:
  r"""Theorem B.1 from PSU runs on a toy with noisy and informative batches.

  `records`: one (noisy [T] bool, gamma [T], entropy [T]) per seed, the per-step batch
  kind, the PSU's sampled precision factor gamma_t (the theorem's s_t) and the batch's
  predictive entropy (tests/test_psu.py's toy: softmax regression, half the batches
  pure label noise). Over the last `tail` steps of each run: mean gamma on informative
  and on noisy batches, and their mean entropies. Readings: (1) "s_t -> 1 for noisy or
  high-entropy batches": |mean gamma_noisy - 1| <= one_tol (`holds_noisy_to_one`);
  (2) "s_t goes up for high-value, low-entropy batches", read as the property SPEC 6
  asks for, gamma lower on noisy batches than on informative ones: margin
  gamma_informative - gamma_noisy > 0 on every seed (`holds`, the tested reading).
  """
  rows = []
  for noisy, gamma, entropy in records:
    n, g, h = (np.asarray(a)[-tail:] for a in (noisy, gamma, entropy))
    n = n.astype(bool)
    rows.append({"gamma_informative": float(g[~n].mean()), "gamma_noisy": float(g[n].mean()),
                 "entropy_informative": float(h[~n].mean()),
                 "entropy_noisy": float(h[n].mean()),
                 "margin": float(g[~n].mean() - g[n].mean())})
  return {"alpha": alpha, "tail": tail, "seeds": rows,
          "mean_margin": float(np.mean([r["margin"] for r in rows])),
          "holds_noisy_to_one": bool(all(abs(r["gamma_noisy"] - 1.0) <= one_tol for r in rows)),
          "holds": bool(all(r["margin"] > 0 for r in rows))}


# ---------------------------------------------------------------- Theorem B.1's PSU toy
# Softmax regression, 8 inputs, 4 classes, batches of 32. Informative batches: inputs on
# dims 0-3, labels the argmax of a fixed teacher (learnable, so the model becomes
# confident: low entropy). Noisy batches: inputs on dims 4-7, uniform random labels (the
# model stays near uniform there: high entropy). Each batch is noisy with p = 1/2. Inner
# optimizer Adam(0.05); the PSU with the config given. Shared by experiments/theory.py and
# tests/test_psu.py / tests/test_theory.py.

B1_D, B1_K, B1_B = 8, 4, 32
B1_TEACHER = np.array([[3., 0, 0, -3], [0, 3, -3, 0], [-3, 3, 0, 0], [0, 0, 3, -3]], np.float32)


def _b1_batch(key, noisy):
  kx, ky = jax.random.split(key)
  x = jax.random.normal(kx, (B1_B, 4))
  zeros = jnp.zeros((B1_B, 4))
  xs = jnp.where(noisy, jnp.concatenate([zeros, x], -1), jnp.concatenate([x, zeros], -1))
  ys = jnp.where(noisy, jax.random.randint(ky, (B1_B,), 0, B1_K), jnp.argmax(x @ B1_TEACHER, -1))
  return xs, ys


def _b1_loss(params, x, y):
  logits = x @ params["w"]["kernel"] + params["b"]["bias"]
  logp = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(logp, y[:, None], -1)), logits


@functools.lru_cache(maxsize=None)
def _b1_runner(cfg, alpha, steps):
  """A jitted run(seed) -> (params, opt_state, (noisy, gamma, entropy) per step).

  Trains with the PSU in exact value mode (value_fn: the loss on the same batch).
  """
  params0 = {"w": {"kernel": jnp.zeros((B1_D, B1_K))}, "b": {"bias": jnp.zeros((B1_K,))}}

  @jax.jit
  def run(seed):
    tx = optax.chain(optax.adam(0.05), psu_lib.psu(cfg, alpha=alpha, seed=seed))

    def step(carry, key):
      params, opt_state = carry
      k_noisy, k_batch = jax.random.split(key)
      noisy = jax.random.bernoulli(k_noisy, 0.5)
      x, y = _b1_batch(k_batch, noisy)
      (loss, logits), grads = jax.value_and_grad(_b1_loss, has_aux=True)(params, x, y)
      entropy = feedback.predictive_entropy(logits)
      updates, opt_state = tx.update(grads, opt_state, params, value=loss, grad=grads,
                                     value_fn=lambda p: _b1_loss(p, x, y)[0], entropy=entropy)
      params = optax.apply_updates(params, updates)
      return (params, opt_state), (noisy, opt_state[1].metrics.gamma, entropy)

    keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(1000), seed), steps)
    (params, opt_state), rec = jax.lax.scan(step, (params0, tx.init(params0)), keys)
    return params, opt_state, rec

  return run


def psu_toy_run(cfg, alpha: float, steps: int, seed: int = 0):
  """(params, opt_state, (noisy, gamma, entropy) per step as NumPy) of one toy run."""
  params, opt_state, rec = _b1_runner(cfg, alpha, steps)(jnp.int32(seed))
  return params, opt_state, jax.tree.map(np.asarray, rec)


