"""Text generation for the degeneration metrics (SPEC section 9, first paragraph).

* GPT-2: ancestral sampling with a KV cache (`generate`): one prefill call writes the
  prompt into the cache, then a `lax.while_loop` feeds one token per step
  (`decode=True`). `generate_no_cache` is the same sampler recomputing the whole
  sequence every step: the reference for tests and the benchmark baseline. With the
  same key both give the same tokens (up to float rounding of near-ties).
* BERT: iterative mask-predict (`mask_predict`, Ghazvininejad et al. 2019): start from
  prompt + N [MASK], sample every masked position, re-mask the lowest-confidence
  share on a linear schedule, repeat for `iterations` rounds.

Sampling (`sample_logits`) is in float32: logits / temperature, then top-k, then top-p
(nucleus) on the tempered distribution, then a categorical draw; temperature 0 is
greedy. Step s of a generation draws with `jax.random.fold_in(key, s)`.

The model always runs in eval mode (`deterministic=True`): the DMU uses its
expectation and the DTU full attention (SPEC 3-4), so generation is a function of the
parameters and the key only.

Choices the SPEC leaves open (documented interpretations):

* Entropy: `entropies[b, i]` is the predictive entropy (nats) of the model's *full*
  next-token distribution at temperature 1, before temperature and top-k/top-p
  truncation: SPEC 9's "generative entropy" is a property of the model, not of the
  sampling settings. (For BERT, with [MASK] and PAD removed: see `mask_predict`.)
* Hidden states: `hidden[b, i]` is the final-layer state (GPT-2: ln_f output; BERT:
  last encoder layer) *at the position of* generated token i, i.e. the model's
  representation of that token in context.
* EOS (`stop_at_eos=True`): a row that samples EOS is done; later steps emit PAD.
  `gen_mask` marks the sampled steps, the EOS step included (its entropy is a real
  sampling step); `lengths` counts the tokens before the first EOS, as
  `stabjax.metrics.generation_lengths(tokens, eos_id, start=P)` does.
* Prompts are [B, P] with a `prompt_mask` (1 = real token); any padding pattern works
  (`prompts_from_split` left-pads). Real prompt tokens take positions 0..L-1 in the
  order they appear, as training rows start at position 0, and generated token i sits
  at position L + i. The output `tokens` is the prompt exactly as given followed by
  the N generated columns.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from stabjax.metrics.generation import predictive_entropy

__all__ = [
    "GenerationOutput", "Prompts", "SamplingConfig", "generate", "generate_no_cache",
    "mask_predict", "prompts_from_split", "remask_counts", "sample_logits",
]


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How text is sampled (SPEC 9). Static under `jax.jit`.

  Attributes:
    max_new_tokens: N, generated tokens per prompt.
    temperature: logits are divided by it; 0 means greedy (argmax).
    top_k: keep only the k most likely tokens; 0 = off.
    top_p: keep the smallest set of most likely tokens whose probability reaches
      top_p (nucleus sampling, Holtzman et al. 2019); 1.0 = off.
    stop_at_eos: after a row samples EOS it emits PAD and is done.
    iterations: BERT mask-predict rounds (1 = sample every position once, in parallel).
  """

  max_new_tokens: int = 64
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  stop_at_eos: bool = True
  iterations: int = 10

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
    if self.iterations < 1:
      raise ValueError(f"iterations must be >= 1, got {self.iterations}")


@flax.struct.dataclass
class GenerationOutput:
  """What the samplers return, for B prompts of length P and N = max_new_tokens.

  Attributes:
    tokens: int32 [B, P + N], the prompts as given, then the generated tokens (PAD
      after the first EOS when `stop_at_eos`).
    gen_mask: bool [B, N], True on the steps that sampled a token (through the first
      EOS, included). All True without `stop_at_eos`.
    entropies: float32 [B, N], predictive entropy (nats) of the model's full
      next-token distribution at temperature 1 at each sampled step; 0 elsewhere.
    hidden: float32 [B, N, d], final-layer hidden states at the generated positions;
      0 outside `gen_mask`.
    lengths: int32 [B], generated tokens before the first EOS (N if none).
    has_eos: bool [B], whether the row generated an EOS.
  """

  tokens: jax.Array
  gen_mask: jax.Array
  entropies: jax.Array
  hidden: jax.Array
  lengths: jax.Array
  has_eos: jax.Array


# ----------------------------------------------------------------------------- sampling


def _keep_threshold(logits: jax.Array, keep: jax.Array) -> jax.Array:
  """logits where `keep`, -inf elsewhere."""
  return jnp.where(keep, logits, -jnp.inf)


def sample_logits(key: jax.Array, logits: jax.Array, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """One token per row of logits [..., V] -> int32 [...].

  float32 throughout: logits / temperature, then top-k, then top-p on the tempered
  distribution (the order of Hugging Face `generate`), then a categorical draw.
  Tokens tied with the last kept one at a top-k / top-p boundary are kept too.
  `temperature == 0` is greedy (argmax); `top_k` 0 and `top_p` 1 are off.
  """
  logits = jnp.asarray(logits, jnp.float32)
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k > 0 and top_k < logits.shape[-1]:
    kth = lax.top_k(logits, top_k)[0][..., -1:]
    logits = _keep_threshold(logits, logits >= kth)
  if top_p < 1.0:
    desc = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(desc, axis=-1)
    # A token is in the nucleus if the mass of the tokens before it is < top_p, so
    # the most likely token is always kept.
    in_nucleus = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    smallest = jnp.min(jnp.where(in_nucleus, desc, jnp.inf), axis=-1, keepdims=True)
    logits = _keep_threshold(logits, logits >= smallest)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _sample(key: jax.Array, logits: jax.Array, config: SamplingConfig) -> jax.Array:
  return sample_logits(key, logits, config.temperature, config.top_k, config.top_p)


# ----------------------------------------------------------------------------- GPT-2


def _prompt_layout(prompts: jax.Array, prompt_mask: jax.Array | None
                   ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """mask [B, P] bool, positions [B, P], real lengths L [B], last real column [B]."""
  b, p = prompts.shape
  mask = (jnp.ones((b, p), bool) if prompt_mask is None
          else jnp.asarray(prompt_mask).astype(bool))
  chex.assert_shape(mask, (b, p))
  count = jnp.cumsum(mask, axis=1, dtype=jnp.int32)
  positions = jnp.maximum(count - 1, 0)
  last = jnp.argmax(jnp.where(mask, jnp.arange(p), -1), axis=1).astype(jnp.int32)
  return mask, positions, count[:, -1], last


def _check_model(model: nn.Module, causal: bool, total: int) -> None:
  cfg = model.config
  if cfg.causal != causal:
    want = "a causal (GPT-2)" if causal else "a BERT"
    raise ValueError(f"this sampler needs {want} model, got arch {cfg.arch!r}")
  if total > cfg.max_len:
    raise ValueError(f"prompt + max_new_tokens = {total} > the model's max_len {cfg.max_len}")


StepFn = Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, jax.Array, Any]]


def _sample_loop(first_logits: jax.Array, state: Any, step_fn: StepFn, key: jax.Array,
                 config: SamplingConfig, eos_id: int, pad_id: int, d_model: int
                 ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Samples N tokens; `step_fn(state, token [B], i) -> (next logits [B, V], hidden [B, d], state)`.

  Returns generated tokens [B, N], gen_mask [B, N], entropies [B, N], hidden [B, N, d].
  Stops early once every row is done (`stop_at_eos`).
  """
  b = first_logits.shape[0]
  n = config.max_new_tokens

  def body(carry):
    i, logits, state, toks, sampled, ents, hids, done = carry
    tok = _sample(jax.random.fold_in(key, i), logits, config)
    active = ~done
    if config.stop_at_eos:
      tok = jnp.where(active, tok, pad_id)
      done = done | (tok == eos_id)
    ent = jnp.where(active, predictive_entropy(logits), 0.0)
    next_logits, hidden, state = step_fn(state, tok, i)
    hidden = jnp.where(active[:, None], hidden, 0.0)
    put = lambda buf, x: lax.dynamic_update_index_in_dim(buf, x, i, axis=1)
    return (i + 1, next_logits, state, put(toks, tok), put(sampled, active), put(ents, ent),
            put(hids, hidden), done)

  def cond(carry):
    i, done = carry[0], carry[-1]
    return (i < n) & ~jnp.all(done) if config.stop_at_eos else i < n

  init = (jnp.zeros((), jnp.int32), first_logits, state,
          jnp.full((b, n), pad_id, jnp.int32), jnp.zeros((b, n), bool),
          jnp.zeros((b, n), jnp.float32), jnp.zeros((b, n, d_model), jnp.float32),
          jnp.zeros((b,), bool))
  _, _, _, toks, sampled, ents, hids, _ = lax.while_loop(cond, body, init)
  return toks, sampled, ents, hids


def _finish(prompts: jax.Array, toks: jax.Array, gen_mask: jax.Array, ents: jax.Array,
            hidden: jax.Array, eos_id: int) -> GenerationOutput:
  is_eos = toks == eos_id
  has_eos = is_eos.any(axis=1)
  lengths = jnp.where(has_eos, jnp.argmax(is_eos, axis=1), toks.shape[1]).astype(jnp.int32)
  tokens = jnp.concatenate([prompts.astype(jnp.int32), toks], axis=1)
  return GenerationOutput(tokens=tokens, gen_mask=gen_mask, entropies=ents, hidden=hidden,
                          lengths=lengths, has_eos=has_eos)


@functools.partial(jax.jit, static_argnames=("model", "config", "eos_id", "pad_id"))
def generate(model: nn.Module, params: Any, prompts: jax.Array,
             prompt_mask: jax.Array | None, key: jax.Array, config: SamplingConfig, *,
             eos_id: int, pad_id: int) -> GenerationOutput:
  """Samples N = config.max_new_tokens tokens after each prompt with a KV cache.

  One prefill call (`decode=True` on the [B, P] prompt) fills cache slots 0..P-1;
  step i then feeds the token it sampled at slot P + i, which yields that token's
  hidden state and the next distribution. The cache holds P + N slots (not max_len),
  and its attention mask hides the prompt's padding.

  Args:
    model: a GPT2 module (`stabjax.models.get_model`), static.
    params: its 'params'.
    prompts: int [B, P] token ids.
    prompt_mask: [B, P], 1/True on real prompt tokens (at least one per row), or None.
    key: PRNG key; step i samples with fold_in(key, i).
    config: SamplingConfig, static.
    eos_id, pad_id: special token ids, static.

  Returns:
    GenerationOutput (see its docstring and the module docstring).
  """
  b, p = prompts.shape
  n = config.max_new_tokens
  _check_model(model, causal=True, total=p + n)
  mask, positions, length, last = _prompt_layout(prompts, prompt_mask)
  cache_mask = jnp.concatenate([mask, jnp.ones((b, n), bool)], axis=1)

  def apply(cache, tokens, pos):
    (logits, hidden), mutated = model.apply(
        {"params": params, "cache": cache}, tokens, positions=pos, attention_mask=cache_mask,
        deterministic=True, decode=True, return_hidden=True, mutable=["cache"])
    return logits, hidden, mutated["cache"]

  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((b, p + n), jnp.int32),
                                             decode=True)["cache"])
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  logits, _, cache = apply(cache, prompts.astype(jnp.int32), positions)
  first = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]

  def step(cache, tok, i):
    logits, hidden, cache = apply(cache, tok[:, None], (length + i)[:, None])
    return logits[:, 0], hidden[:, 0], cache

  toks, gen_mask, ents, hidden = _sample_loop(first, cache, step, key, config, eos_id, pad_id,
                                              model.config.d_model)
  return _finish(prompts, toks, gen_mask, ents, hidden, eos_id)


@functools.partial(jax.jit, static_argnames=("model", "config", "eos_id", "pad_id"))
def generate_no_cache(model: nn.Module, params: Any, prompts: jax.Array,
                      prompt_mask: jax.Array | None, key: jax.Array, config: SamplingConfig,
                      *, eos_id: int, pad_id: int) -> GenerationOutput:
  """`generate` without a cache: every step runs the model on the whole [B, P + N] buffer.

  The buffer has a fixed shape (no recompilation); causality keeps the not yet
  generated columns from influencing the ones read. Same arguments, same sampling
  (same key -> same tokens) and outputs as `generate`; O(N (P + N)) token forwards
  instead of O(P + N).
  """
  b, p = prompts.shape
  n = config.max_new_tokens
  _check_model(model, causal=True, total=p + n)
  mask, positions, length, last = _prompt_layout(prompts, prompt_mask)
  attn = jnp.concatenate([mask, jnp.ones((b, n), bool)], axis=1)
  positions = jnp.concatenate([positions, length[:, None] + jnp.arange(n)], axis=1)
  buffer = jnp.concatenate([prompts.astype(jnp.int32), jnp.full((b, n), pad_id, jnp.int32)], 1)

  def forward(buffer):
    return model.apply({"params": params}, buffer, positions=positions, attention_mask=attn,
                       deterministic=True, return_hidden=True)

  logits, _ = forward(buffer)
  first = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]

  def step(buffer, tok, i):
    buffer = lax.dynamic_update_index_in_dim(buffer, tok, p + i, axis=1)
    logits, hidden = forward(buffer)
    at = lambda x: lax.dynamic_index_in_dim(x, p + i, axis=1, keepdims=False)
    return at(logits), at(hidden), buffer

  toks, gen_mask, ents, hidden = _sample_loop(first, buffer, step, key, config, eos_id, pad_id,
                                              model.config.d_model)
  return _finish(prompts, toks, gen_mask, ents, hidden, eos_id)


# ----------------------------------------------------------------------------- BERT


def remask_counts(num_tokens: int, iterations: int) -> list[int]:
  """Tokens re-masked after each mask-predict round: floor(N (T - t) / T), t = 1..T.

  The linear schedule of Ghazvininejad et al. (2019); the last entry is 0.
  """
  return [num_tokens * (iterations - t) // iterations for t in range(1, iterations + 1)]


@functools.partial(jax.jit, static_argnames=("model", "config", "mask_id", "eos_id", "pad_id"))
def mask_predict(model: nn.Module, params: Any, prompts: jax.Array,
                 prompt_mask: jax.Array | None, key: jax.Array, config: SamplingConfig, *,
                 mask_id: int, eos_id: int, pad_id: int) -> GenerationOutput:
  """BERT generation by iterative mask-predict (Gibbs-style) sampling (SPEC 9).

  Each row is laid out as its real prompt tokens (positions 0..L-1), then N generated
  slots, then padding (not attended). Round 0 starts with all N slots [MASK]. In round
  t = 0..T-1 (T = config.iterations) the model sees the current sequence, every
  masked slot is *sampled* (temperature / top-k / top-p, key fold_in(key, t)), and
  its confidence becomes the model's probability of the sampled token. Then the
  `remask_counts(N, T)[t]` lowest-confidence slots are masked again (slots sampled in
  earlier rounds keep their confidence). This is Ghazvininejad et al. (2019)'s
  schedule with sampling instead of argmax, so that generation is stochastic like
  GPT-2's; we chose it over a one-position-at-a-time Gibbs sweep because it costs
  T model calls instead of N.

  [MASK] and PAD are never sampled (they are never MLM targets); entropies are those
  of the distribution with them removed, at temperature 1, in the round that set the
  final token. After the last round the first generated EOS ends the text
  (`stop_at_eos`): later slots become PAD, and the hidden states come from one more
  forward pass over the final text (prompt + tokens through the EOS).

  Same arguments and outputs as `generate`, plus the static `mask_id`.
  """
  b, p = prompts.shape
  n, rounds = config.max_new_tokens, config.iterations
  total = p + n
  _check_model(model, causal=False, total=total)
  mask = (jnp.ones((b, p), bool) if prompt_mask is None
          else jnp.asarray(prompt_mask).astype(bool))
  chex.assert_shape(mask, (b, p))
  length = mask.sum(axis=1, dtype=jnp.int32)
  # Real prompt tokens first, in order (stable sort), so they sit at positions 0..L-1.
  order = jnp.argsort(~mask, axis=1, stable=True)
  compact = jnp.take_along_axis(prompts.astype(jnp.int32), order, axis=1)
  compact = jnp.concatenate([compact, jnp.full((b, n), pad_id, jnp.int32)], axis=1)
  col = jnp.arange(total)[None, :]
  gen_pos = length[:, None] + jnp.arange(n)[None, :]  # [B, N]
  in_prompt = col < length[:, None]
  counts = jnp.asarray(remask_counts(n, rounds), jnp.int32)
  banned = jnp.zeros((model.config.vocab_size,), bool).at[jnp.array([mask_id, pad_id])].set(True)

  def layout(gen: jax.Array, num_real_gen: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The [B, P + N] input ids and attention mask for generated tokens gen [B, N]."""
    gen_at = jnp.take_along_axis(gen, jnp.clip(col - length[:, None], 0, n - 1), axis=1)
    attn = col < (length + num_real_gen)[:, None]
    ids = jnp.where(in_prompt, compact, jnp.where(attn, gen_at, pad_id))
    return ids, attn

  def model_at_gen(gen, num_real_gen, return_hidden=False):
    ids, attn = layout(gen, num_real_gen)
    out = model.apply({"params": params}, ids, attention_mask=attn, deterministic=True,
                      return_hidden=return_hidden)
    at = lambda x: jnp.take_along_axis(x, gen_pos[..., None], axis=1)
    return jax.tree.map(at, out)

  def one_round(t, carry):
    gen, masked, conf, ents = carry
    logits = model_at_gen(jnp.where(masked, mask_id, gen), jnp.full((b,), n))
    logits = jnp.where(banned, -jnp.inf, logits)  # [B, N, V]
    tok = _sample(jax.random.fold_in(key, t), logits, config)
    logp = jax.nn.log_softmax(logits, axis=-1)
    tok_conf = jnp.take_along_axis(logp, tok[..., None], axis=-1)[..., 0]
    gen = jnp.where(masked, tok, gen)
    conf = jnp.where(masked, tok_conf, conf)
    ents = jnp.where(masked, predictive_entropy(logits), ents)
    # Rank 0 = least confident; ties go to the earlier slot.
    rank = jnp.argsort(jnp.argsort(conf, axis=1, stable=True), axis=1, stable=True)
    return gen, rank < counts[t], conf, ents

  init = (jnp.full((b, n), mask_id, jnp.int32), jnp.ones((b, n), bool),
          jnp.zeros((b, n), jnp.float32), jnp.zeros((b, n), jnp.float32))
  gen, _, _, ents = lax.fori_loop(0, rounds, one_round, init)

  if config.stop_at_eos:
    is_eos = gen == eos_id
    first = jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1), n)
    gen_mask = jnp.arange(n)[None, :] <= first[:, None]
    gen = jnp.where(gen_mask, gen, pad_id)
  else:
    gen_mask = jnp.ones((b, n), bool)
  _, hidden = model_at_gen(gen, gen_mask.sum(axis=1), return_hidden=True)
  hidden = jnp.where(gen_mask[..., None], hidden, 0.0)
  ents = jnp.where(gen_mask, ents, 0.0)
  chex.assert_shape(hidden, (b, n, model.config.d_model))
  return _finish(prompts, gen, gen_mask, ents, hidden, eos_id)


# ----------------------------------------------------------------------------- prompts


class Prompts(NamedTuple):
  """Prompts for the samplers: tokens, mask int32 [num, prompt_len]; rows [num] (source rows)."""

  tokens: np.ndarray
  mask: np.ndarray
  rows: np.ndarray


def prompts_from_split(tokens: np.ndarray, mask: np.ndarray, prompt_len: int, num: int,
                       seed: int = 0, *, eos_id: int | None = None,
                       pad_id: int = 0) -> Prompts:
  """The first `prompt_len` tokens of `num` rows of a split, left-padded (deterministic).

  Rows are taken in the order of a permutation seeded by `seed`, rows whose first
  `prompt_len` tokens are all real and hold no EOS first ("full" prompts), so a
  packed text split gives full prompts. A row's prompt is its real tokens among the
  first `prompt_len`, cut before the first EOS (a prompt that already ended would
  make the model start a new text); rows whose prompt would then be empty are never
  taken. Prompts are left-padded with `pad_id`, so every row's last column is real.

  Args:
    tokens, mask: [rows, seq_len] a split (`Split.tokens`, `Split.mask`).
    prompt_len: P <= seq_len.
    num: prompts wanted; fewer come back when fewer rows give a non-empty prompt.
    seed: selects the rows.
    eos_id: cut prompts before it; None: no cut.
    pad_id: left padding.

  Raises:
    ValueError: no row gives a non-empty prompt.
  """
  tokens = np.asarray(tokens)
  mask = np.asarray(mask).astype(bool)
  if tokens.ndim != 2 or mask.shape != tokens.shape:
    raise ValueError(f"tokens and mask must be the same [rows, seq_len], got "
                     f"{tokens.shape} and {mask.shape}")
  if not 1 <= prompt_len <= tokens.shape[1]:
    raise ValueError(f"prompt_len must be in [1, {tokens.shape[1]}], got {prompt_len}")
  head, real = tokens[:, :prompt_len], mask[:, :prompt_len]
  if eos_id is not None:
    # Everything from the first EOS on is dropped (cumulative "seen EOS").
    real = real & (np.cumsum(head == eos_id, axis=1) == 0)
  count = real.sum(axis=1)
  full = count == prompt_len
  perm = np.random.default_rng(seed).permutation(tokens.shape[0])
  perm = perm[count[perm] > 0]
  order = perm[np.argsort(~full[perm], kind="stable")]
  if not len(order):
    raise ValueError("no row of the split gives a non-empty prompt")
  rows = order[:num]
  num = len(rows)
  out = np.full((num, prompt_len), pad_id, np.int32)
  out_mask = np.zeros((num, prompt_len), np.int32)
  for i, r in enumerate(rows):
    kept = head[r][real[r]]
    out[i, prompt_len - len(kept):] = kept
    out_mask[i, prompt_len - len(kept):] = 1
  return Prompts(tokens=out, mask=out_mask, rows=rows.astype(np.int64))
