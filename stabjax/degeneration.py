"""Generate text from a trained model and measure its degeneration (SPEC section 9).

`measure(...)` samples continuations of validation prompts (GPT-2 with a KV cache,
BERT by mask-predict), decodes them, and computes every metric of `stabjax.metrics`;
on the synthetic language it adds the theory's quantities (P_theta(S_0), the forward
KL d(P_emp || P_theta) and H(P_theta), paper Lemma 4.2 and Theorem 5.5).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from stabjax import metrics, sampling


@dataclasses.dataclass(frozen=True)
class GenerationEvalConfig:
  num_samples: int = 64  # prompts (generations) per run
  prompt_len: int = 4  # tokens of each validation row used as the prompt
  max_new_tokens: int = 0  # 0: seq_len - prompt_len
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  hf_top_k: int = 20  # K of the high-frequency word proportion
  batch_size: int = 64  # generations per sampler call
  seed: int = 0

  def __post_init__(self):
    for name in ("num_samples", "prompt_len", "hf_top_k", "batch_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")


def _sampling_config(cfg: GenerationEvalConfig, seq_len: int) -> sampling.SamplingConfig:
  n = cfg.max_new_tokens or max(seq_len - cfg.prompt_len, 1)
  return sampling.SamplingConfig(max_new_tokens=n, temperature=cfg.temperature,
                                 top_k=cfg.top_k, top_p=cfg.top_p)


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
      out = sampling.mask_predict(model, params, p, m, k, scfg, mask_id=tok.mask_id,
                                  eos_id=tok.eos_id, pad_id=tok.pad_id)
    outs.append(jax.device_get(out))
  return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)


def _generated_ids(out, prompt_len: int) -> list[list[int]]:
  """Generated token ids of each row, up to (not including) the first EOS."""
  gen = np.asarray(out.tokens)[:, prompt_len:]
  return [row[:n].tolist() for row, n in zip(gen, np.asarray(out.lengths))]


def sequence_logprobs(model: nn.Module, params, tokens: np.ndarray, mask: np.ndarray,
                      batch_size: int = 256) -> np.ndarray:
  """log P_theta of whole sequences (BOS excluded, EOS included), in batches."""
  @jax.jit
  def logp(t, m):
    logits = model.apply({"params": params}, t, deterministic=True)
    return metrics.sequence_logprob(logits, t, m)
  return np.concatenate([np.asarray(logp(jnp.asarray(tokens[i:i + batch_size]),
                                         jnp.asarray(mask[i:i + batch_size])))
                         for i in range(0, len(tokens), batch_size)])


def synthetic_measures(model: nn.Module, params, dataset, key: jax.Array, num_samples: int,
                       batch_size: int) -> dict[str, float]:
  """P_theta(S_0), d(P_emp || P_theta), H(P_emp), H(P_theta) (Monte Carlo) on synthetic data."""
  emp = dataset.train_empirical()
  model_logp = sequence_logprobs(model, params, emp.sequences, emp.mask)
  # Unconditional samples from BOS for the Monte-Carlo entropy of P_theta.
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


def measure(model: nn.Module, params: Any, dataset, cfg: GenerationEvalConfig
            ) -> tuple[dict[str, float], list[str]]:
  """All degeneration metrics of one trained model, and the generated texts."""
  tok = dataset.tokenizer
  causal = bool(getattr(model.config, "causal", True))
  val = dataset.validation
  prompts = sampling.prompts_from_split(np.asarray(val.tokens), np.asarray(val.mask),
                                        cfg.prompt_len, min(cfg.num_samples, len(val.tokens)),
                                        seed=cfg.seed, eos_id=tok.eos_id, pad_id=tok.pad_id)
  scfg = _sampling_config(cfg, dataset.seq_len)
  key = jax.random.PRNGKey(cfg.seed)
  out = _sample(model, causal, params, prompts.tokens, prompts.mask, key, scfg, tok,
                cfg.batch_size)
  ids = _generated_ids(out, prompts.tokens.shape[1])
  texts = [tok.decode(x) for x in ids]
  result = metrics.summarize_text_metrics(
      texts, ids, dataset.train_word_counts(), dataset.validation_texts(limit=1000),
      k=cfg.hf_top_k)
  gen_mask = np.asarray(out.gen_mask)
  lengths = metrics.length_stats(out.tokens, tok.eos_id, start=prompts.tokens.shape[1])
  result.update({
      "generative_entropy": metrics.generative_entropy(out.entropies, mask=gen_mask),
      "effective_rank": metrics.effective_rank(out.hidden, mask=gen_mask),
      "length_mean": lengths["mean"], "length_std": lengths["std"],
      "no_eos_share": lengths["no_eos_share"],
  })
  if dataset.synthetic is not None and causal:
    syn = synthetic_measures(model, params, dataset, jax.random.fold_in(key, 10**6),
                             cfg.num_samples, cfg.batch_size)
    result.update({f"syn/{k}": v for k, v in syn.items()})
  return result, texts
