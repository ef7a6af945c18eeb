"""Generate text from a trained model and measure its degeneration (SPEC section 9).

`measure(...)` continues the same validation prompts under every decoder of
`GenerationEvalConfig.decoders` (temperature sampling, greedy, top-k, nucleus: the
paper does not say how it decodes, so decoding is a measured axis), with the same base
key, and computes every metric of `stabjax.metrics` per decoder (GPT-2 with a KV
cache, BERT by left-to-right unmasking). On the synthetic language it adds, once, the
theory's quantities (P_theta(S_0), the forward KL d(P_emp || P_theta), H(P_theta);
paper Lemma 4.2 and Theorem 5.5), which do not depend on the decoder.

`measure_quick(...)` is the same path on a small batch (one decoder, no reference
text), cheap enough for every evaluation step of a training loop.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import typing
from typing import Any, Literal, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from stabjax import metrics, sampling

# sample: ancestral sampling at `temperature`; greedy: argmax; top_k / nucleus: sampling
# at `temperature` from the `top_k` most likely tokens / the smallest set of mass `top_p`.
Decoder = Literal["sample", "greedy", "top_k", "nucleus"]
DECODERS: tuple[str, ...] = typing.get_args(Decoder)


@dataclasses.dataclass(frozen=True)
class GenerationEvalConfig:
  """The end-of-run generation: the same prompts under each of `decoders`.

  Attributes:
    num_samples: prompts (generations per decoder) measured at the end of a run.
    prompt_len: tokens of each validation row used as the prompt.
    max_new_tokens: tokens per generation (0: seq_len - prompt_len).
    decoders: the decoders every run is measured under, from the same prompts (distinct).
    temperature: temperature of sample, top_k and nucleus (> 0; greedy has none).
    top_k: k of the top_k decoder (>= 1).
    top_p: p of the nucleus decoder, in (0, 1].
    hf_top_k: K of the high-frequency word proportion.
    batch_size: generations per sampler call.
    eval_gen_prompts: prompts of the small generation batch measured at every evaluation
      step of training (`measure_quick`, sampling; 0: none).
    eval_gen_tokens: tokens per generation of that batch.
    seed: seed of the prompts and the sampling.
  """

  num_samples: int = 64
  prompt_len: int = 4
  max_new_tokens: int = 0
  decoders: tuple[Decoder, ...] = DECODERS
  temperature: float = 1.0
  top_k: int = 40
  top_p: float = 0.9
  hf_top_k: int = 20
  batch_size: int = 64
  eval_gen_prompts: int = 16
  eval_gen_tokens: int = 32
  seed: int = 0

  def __post_init__(self):
    # A list (config JSON) or "a,b" (a flag) becomes a tuple: the config stays hashable.
    decoders = self.decoders
    if isinstance(decoders, str):
      decoders = [d.strip() for d in decoders.split(",")]
    object.__setattr__(self, "decoders", tuple(decoders))
    bad = [d for d in self.decoders if d not in DECODERS]
    if bad or not self.decoders or len(set(self.decoders)) != len(self.decoders):
      raise ValueError(f"--decoders={','.join(map(str, self.decoders))!r} is not accepted; "
                       f"accepted: distinct names among {', '.join(DECODERS)}")
    for name in ("num_samples", "prompt_len", "hf_top_k", "batch_size", "top_k",
                 "eval_gen_tokens"):
      if getattr(self, name) < 1:
        raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
    if self.eval_gen_prompts < 0:
      raise ValueError(f"--eval_gen_prompts must be >= 0 (0: none), got {self.eval_gen_prompts}")
    if self.max_new_tokens < 0:
      raise ValueError(f"--max_new_tokens must be >= 0 (0: seq_len - prompt_len), got "
                       f"{self.max_new_tokens}")
    if not self.temperature > 0:
      raise ValueError(f"--temperature must be > 0 (greedy is its own decoder), got "
                       f"{self.temperature}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"--top_p must be in (0, 1], got {self.top_p}")


def decoder_config(cfg: GenerationEvalConfig, decoder: str, max_new_tokens: int
                   ) -> sampling.SamplingConfig:
  """The SamplingConfig of one decoder (all share the sampler's compilation)."""
  t = cfg.temperature
  kw = {"sample": dict(temperature=t), "greedy": dict(temperature=0.0),
        "top_k": dict(temperature=t, top_k=cfg.top_k),
        "nucleus": dict(temperature=t, top_p=cfg.top_p)}[decoder]
  return sampling.SamplingConfig(max_new_tokens=max_new_tokens, **kw)


def _num_new_tokens(cfg: GenerationEvalConfig, seq_len: int) -> int:
  return cfg.max_new_tokens or max(seq_len - cfg.prompt_len, 1)


def _sample(model: nn.Module, causal: bool, params, prompts: np.ndarray, mask: np.ndarray,
            key: jax.Array, scfg: sampling.SamplingConfig, tok, batch_size: int):
  """Runs the sampler in chunks of batch_size; returns the outputs concatenated (NumPy)."""
  outs = []
  for i, start in enumerate(range(0, len(prompts), batch_size)):
    p, m = jnp.asarray(prompts[start:start + batch_size]), jnp.asarray(mask[start:start + batch_size])
    k = jax.random.fold_in(key, i)
    if causal:
      out = sampling.generate(model, params, p, m, k, scfg, eos_id=tok.eos_id, pad_id=tok.pad_id)
    else:
      out = sampling.unmask_left_to_right(model, params, p, m, k, scfg, mask_id=tok.mask_id,
                                          eos_id=tok.eos_id, pad_id=tok.pad_id)
    outs.append(jax.device_get(out))
  return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)


def _generated_ids(out, prompt_len: int) -> list[list[int]]:
  """Generated token ids of each row, up to (not including) the first EOS."""
  gen = np.asarray(out.tokens)[:, prompt_len:]
  return [row[:n].tolist() for row, n in zip(gen, np.asarray(out.lengths))]


@functools.partial(jax.jit, static_argnames="model")
def _sequence_logprob(model: nn.Module, params, tokens, mask):
  logits = model.apply({"params": params}, tokens, deterministic=True)
  return metrics.sequence_logprob(logits, tokens, mask)


def sequence_logprobs(model: nn.Module, params, tokens: np.ndarray, mask: np.ndarray,
                      batch_size: int = 256, width_step: int = 16) -> np.ndarray:
  """log P_theta of whole sequences (BOS excluded, EOS included) under a causal LM.

  A row's score depends only on its columns up to its last masked-in one, so rows are
  scored sorted by that length, each batch cut to its longest row (rounded up to a
  multiple of `width_step`, so that few shapes compile) and filled up to `batch_size`
  rows: the synthetic language's sequences are mostly far shorter than seq_len.
  """
  tokens, mask = np.asarray(tokens), np.asarray(mask)
  n, t = tokens.shape
  if n == 0:
    return np.zeros(0, np.float32)
  cols = np.arange(1, t + 1)
  needed = np.max(np.where(mask > 0, cols, 0), axis=1)
  order = np.argsort(needed, kind="stable")
  rows = min(batch_size, n)
  out = np.empty(n, np.float32)
  for i in range(0, n, rows):
    idx = order[i:i + rows]
    width = min(t, -(-max(int(needed[idx].max()), 1) // width_step) * width_step)
    fill = np.zeros(rows - len(idx), idx.dtype)  # repeats row 0 to a full batch; dropped
    take = np.concatenate([idx, fill])
    logp = _sequence_logprob(model, params, jnp.asarray(tokens[take, :width]),
                             jnp.asarray(mask[take, :width]))
    out[idx] = np.asarray(logp)[:len(idx)]
  return out


def synthetic_measures(model: nn.Module, params, dataset, key: jax.Array, num_samples: int,
                       batch_size: int) -> dict[str, float]:
  """P_theta(S_0), d(P_emp || P_theta), H(P_emp), H(P_theta) (Monte Carlo) on synthetic data.

  H(P_theta) is estimated from ancestral samples (temperature 1, no truncation) from
  BOS, whatever the decoders: these are properties of the model.
  """
  emp = dataset.train_empirical()
  model_logp = sequence_logprobs(model, params, emp.sequences, emp.mask)
  tok = dataset.tokenizer
  seq_len = dataset.seq_len
  bos = np.full((num_samples, 1), tok.bos_id, np.int32)
  scfg = sampling.SamplingConfig(max_new_tokens=seq_len - 1)
  out = _sample(model, True, params, bos, np.ones_like(bos), key, scfg, tok, batch_size)
  tokens = np.asarray(out.tokens)
  smask = np.concatenate([np.ones_like(bos), np.asarray(out.gen_mask)], axis=1).astype(np.int32)
  sample_logp = sequence_logprobs(model, params, np.where(smask > 0, tokens, tok.pad_id), smask)
  result = metrics.synthetic_metrics(emp.p_emp, model_logp, sample_logp)
  result["samples_without_eos"] = float(np.mean(~np.asarray(out.has_eos)))
  return result


def _measure_decoders(model: nn.Module, params: Any, dataset, cfg: GenerationEvalConfig,
                      references: bool) -> tuple[dict[str, dict[str, float]],
                                                 dict[str, list[str]]]:
  """Metrics and texts per decoder: the path shared by `measure` and `measure_quick`.

  Every decoder continues the same prompts with the same base key (so greedy and
  sampling differ only by the decoder). Without `references` the held-out reference
  text is not measured (the `_reference` keys are absent).
  """
  tok = dataset.tokenizer
  causal = bool(getattr(model.config, "causal", True))
  val = dataset.validation
  prompts = sampling.prompts_from_split(np.asarray(val.tokens), np.asarray(val.mask),
                                        cfg.prompt_len, min(cfg.num_samples, len(val.tokens)),
                                        seed=cfg.seed, eos_id=tok.eos_id, pad_id=tok.pad_id)
  n = _num_new_tokens(cfg, dataset.seq_len)
  key = jax.random.PRNGKey(cfg.seed)
  train_counts = dataset.train_word_counts()
  reference = dataset.validation_texts(limit=1000) if references else None
  start = prompts.tokens.shape[1]
  result = {}
  texts = {"prompts": [tok.decode(row[m > 0]) for row, m in zip(prompts.tokens, prompts.mask)]}
  for decoder in cfg.decoders:
    out = _sample(model, causal, params, prompts.tokens, prompts.mask, key,
                  decoder_config(cfg, decoder, n), tok, cfg.batch_size)
    ids = _generated_ids(out, start)
    texts[decoder] = [tok.decode(x) for x in ids]
    r = dict(metrics.summarize_text_metrics(texts[decoder], ids, train_counts, reference,
                                            k=cfg.hf_top_k))
    gen_mask = np.asarray(out.gen_mask)
    lengths = metrics.length_stats(out.tokens, tok.eos_id, start=start)
    r.update({
        "generative_entropy": metrics.generative_entropy(out.entropies, mask=gen_mask),
        "effective_rank": metrics.effective_rank(out.hidden, mask=gen_mask),
        "length_mean": lengths["mean"], "length_std": lengths["std"],
        "no_eos_share": lengths["no_eos_share"],
    })
    result[decoder] = r
  return result, texts


def measure(model: nn.Module, params: Any, dataset, cfg: GenerationEvalConfig
            ) -> tuple[dict[str, dict[str, float]], dict[str, list[str]]]:
  """All degeneration metrics of one trained model, and the generated texts.

  Returns (result, texts): result[decoder] is the flat metric dict of that decoder
  (hf_proportion, its *_reference twins, generative_entropy, effective_rank, lengths,
  ...) for each of cfg.decoders, plus result["synthetic"] (the P_theta quantities) on
  synthetic data with a GPT-2; texts[decoder] is the list of generated texts and
  texts["prompts"] the decoded prompts they continue, in the same order (render them
  with `format_samples`).
  """
  result, texts = _measure_decoders(model, params, dataset, cfg, references=True)
  causal = bool(getattr(model.config, "causal", True))
  if dataset.synthetic is not None and causal:
    key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 10**6)
    result["synthetic"] = synthetic_measures(model, params, dataset, key, cfg.num_samples,
                                             cfg.batch_size)
  return result, texts


QUICK_KEYS = ("hf_proportion", "generative_entropy")


def measure_quick(model: nn.Module, params: Any, dataset, cfg: GenerationEvalConfig,
                  num_prompts: int = 16, max_new_tokens: int = 32, decoder: str = "sample"
                  ) -> tuple[dict[str, float], dict[str, list[str]]]:
  """hf_proportion and generative_entropy of a small generation batch (one decoder).

  `measure` restricted to the first `num_prompts` prompts, `max_new_tokens` tokens and
  `decoder` (same code path, same numbers), without reference text or synthetic
  quantities: for a training loop's evaluation steps. The sampler compiles once.
  Returns (metrics, texts) with texts as in `measure`.
  """
  small = dataclasses.replace(cfg, num_samples=num_prompts, max_new_tokens=max_new_tokens,
                              decoders=(decoder,))
  result, texts = _measure_decoders(model, params, dataset, small, references=False)
  return {k: result[decoder][k] for k in QUICK_KEYS}, texts


_HEADER = "=== decoder: {} ==="
_HEADER_RE = re.compile(r"^=== decoder: (\S+) ===$", re.M)


def format_samples(texts: Mapping[str, Sequence[str]]) -> str:
  """samples.txt: one section per decoder, a '=== decoder: NAME ===' line, then '[i] text'
  entries separated by blank lines. `parse_samples` reads it back."""
  sections = [_HEADER.format(d) + "\n" + "\n\n".join(f"[{i}] {t}" for i, t in enumerate(ts))
              for d, ts in texts.items()]
  return "\n\n".join(sections) + "\n"


def parse_samples(text: str) -> dict[str, list[str]]:
  """The texts of each decoder of a `format_samples` output (texts may hold newlines)."""
  heads = list(_HEADER_RE.finditer(text))
  out = {}
  for j, h in enumerate(heads):
    # Drop the newline after the header and the separator before the next one.
    end = heads[j + 1].start() - 2 if j + 1 < len(heads) else len(text) - 1
    body, entries = text[h.end() + 1:end], []
    pos = len("[0] ")
    while body:
      sep = f"\n\n[{len(entries) + 1}] "
      stop = body.find(sep, pos)
      entries.append(body[pos:stop if stop >= 0 else len(body)])
      if stop < 0:
        break
      pos = stop + len(sep)
    out[h.group(1)] = entries
  return out
