"""Word-level degeneration metrics on generated text (SPEC section 9, paper section 6.2).

Everything here is a pure function of Python / NumPy data and returns Python floats
(or small dicts of them). A metric that has no data to be computed on (no generated
words, no n-grams, ...) is `nan`, never 0, so that an empty run is not mistaken for a
perfect or a collapsed one.

Units. Words are lowercase `[a-z']+` runs of the decoded text (SPEC 9). The word-level
quantities (high-frequency proportion, unigram entropy and KL, Zipf, distinct-n) are
computed on words, so that models with different tokenizers (and the held-out reference
text, which has no model tokens) are comparable. seq-rep-n and the repetition share are
defined on any sequence of hashable items; `summarize_text_metrics` applies them to the
model's tokens, as Welleck et al. (2019) and Holtzman et al. (2019) did.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Hashable, Iterable, Mapping, Sequence

import numpy as np

# The one word tokenizer (SPEC 9), defined in stabjax/words.py so that stabjax.data (the
# training word counts) shares it without importing JAX; re-exported as `words` here.
from stabjax.words import words


def _counts(items: Iterable[Hashable] | Mapping[Hashable, int]) -> Mapping[Hashable, int]:
  if isinstance(items, Mapping):
    return items
  return collections.Counter(items)


def top_k_words(counter: Mapping[str, int], k: int) -> list[str]:
  """The `k` most frequent words of `counter`, most frequent first.

  Ties are broken alphabetically, so the set is deterministic whatever order the
  counter was filled in. Fewer than `k` words: all of them.
  """
  if k < 0:
    raise ValueError(f"k must be >= 0, got {k}")
  ranked = sorted(counter.items(), key=lambda wc: (-wc[1], wc[0]))
  return [w for w, _ in ranked[:k]]


def high_freq_proportion(generated_words: Sequence[str], top_words: Iterable[str]) -> float:
  """Share of `generated_words` that are in `top_words` (the paper's core metric, Table 1).

  `top_words` is normally `top_k_words(train_counts, 20)`. Repeated generated words count
  each time. `nan` when there are no generated words.
  """
  if not generated_words:
    return math.nan
  top = set(top_words)
  return sum(w in top for w in generated_words) / len(generated_words)


def _entropy_of_counts(counts: np.ndarray) -> float:
  counts = np.asarray(counts, np.float64)
  counts = counts[counts > 0]
  total = counts.sum()
  if total == 0:
    return math.nan
  p = counts / total
  return float(-(p * np.log(p)).sum())


def unigram_entropy(items: Iterable[Hashable] | Mapping[Hashable, int]) -> float:
  """Shannon entropy (nats) of the empirical distribution of the generated words.

  Accepts the words themselves or a word -> count mapping. `nan` for no words, 0 for
  one word repeated.
  """
  return _entropy_of_counts(np.fromiter(_counts(items).values(), np.float64))


def unigram_kl(generated_counts: Mapping[Hashable, int] | Iterable[Hashable],
               train_counts: Mapping[Hashable, int] | Iterable[Hashable],
               smoothing: float = 0.5) -> float:
  """d(P_gen || P_train) in nats over unigram word distributions (SPEC 9).

  P_gen is the empirical distribution of the generated words, not smoothed; only the
  training side is, with s = `smoothing` over the union vocabulary V = V_train | V_gen:

    P_gen(w) = c_gen(w) / N_gen,   P_train(w) = (c_train(w) + s) / (N_train + s |V|),
    KL = sum over w with c_gen(w) > 0 of P_gen(w) log(P_gen(w) / P_train(w)).

  Smoothing the generated side too (add-one over V, as this did before) buries ~1k
  generated words under ~12k pseudo-counts and flattens the metric. P_train needs it, so
  that a generated word the training corpus lacks costs log(P_gen(w) (N_train + s |V|)
  / s) instead of infinity. s = 0.5 (add-half, the Krichevsky-Trofimov estimator) rather
  than 1 because the pseudo-counts then take s |V| / (N_train + s |V|) = 3% of P_train
  instead of 6% on tinyshakespeare (~184k training words, ~12.6k types), and an unseen
  word (s) stays below a word seen once (1 + s), by a factor 3. `nan` when there are no
  generated words.
  """
  if not smoothing > 0:
    raise ValueError(f"smoothing must be > 0 (else an unseen word gives inf), got {smoothing}")
  gen, train = _counts(generated_counts), _counts(train_counts)
  n_gen = sum(gen.values())
  if n_gen == 0:
    return math.nan
  n_train = sum(train.values())
  support = [w for w, c in gen.items() if c > 0]
  vocab_size = len({w for w, c in train.items() if c > 0} | set(support))
  p = np.array([gen[w] for w in support], np.float64) / n_gen
  q = (np.array([train.get(w, 0) for w in support], np.float64) + smoothing) \
      / (n_train + smoothing * vocab_size)
  return float((p * (np.log(p) - np.log(q))).sum())


def zipf_coefficient(items: Iterable[Hashable] | Mapping[Hashable, int], top: int = 5000) -> float:
  """Minus the least-squares slope of log count against log rank, top `top` ranks (SPEC 9).

  As in Holtzman et al. (2019): counts are sorted in decreasing order and given the
  ordinal ranks 1, 2, 3, ...; tied words take consecutive ranks. Only the counts enter
  the fit, so which of the tied words gets which rank does not change the value.
  About 0.93 on human English; higher means a steeper, less diverse distribution.
  `nan` with fewer than two distinct words (no slope to fit).
  """
  counts = np.sort(np.fromiter(_counts(items).values(), np.float64))[::-1]
  counts = counts[counts > 0][:top]
  if counts.size < 2:
    return math.nan
  x = np.log(np.arange(1, counts.size + 1, dtype=np.float64))
  y = np.log(counts)
  xc = x - x.mean()
  slope = float((xc * (y - y.mean())).sum() / (xc * xc).sum())
  return -slope


def _ngrams(seq: Sequence[Hashable], n: int) -> list[tuple]:
  seq = list(seq)
  return [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]


def seq_rep_n(generations: Iterable[Sequence[Hashable]], n: int) -> float:
  """seq-rep-n of Welleck et al. (2019): mean over generations of 1 - |unique n-grams| / |n-grams|.

  Generations shorter than `n` (no n-gram) are left out of the mean; `nan` when no
  generation has an n-gram. 0 means no repeated n-gram; a single item repeated L times
  gives 1 - 1 / (L - n + 1).
  """
  if n < 1:
    raise ValueError(f"n must be >= 1, got {n}")
  reps = []
  for gen in generations:
    grams = _ngrams(gen, n)
    if grams:
      reps.append(1.0 - len(set(grams)) / len(grams))
  return float(np.mean(reps)) if reps else math.nan


def distinct_n(generations: Iterable[Sequence[Hashable]], n: int) -> float:
  """distinct-n: distinct n-grams over total n-grams, pooled over all generations (SPEC 9).

  (Holtzman et al.'s script counts n-grams seen exactly once instead; this is the
  distinct-over-total of Li et al. (2016) that the SPEC asks for.) `nan` without n-grams.
  """
  if n < 1:
    raise ValueError(f"n must be >= 1, got {n}")
  seen: set[tuple] = set()
  total = 0
  for gen in generations:
    grams = _ngrams(gen, n)
    seen.update(grams)
    total += len(grams)
  return len(seen) / total if total else math.nan


def _is_primitive(phrase: list) -> bool:
  """True when `phrase` is not a whole repetition of a shorter phrase ('ab', not 'abab')."""
  n = len(phrase)
  return not any(n % d == 0 and phrase == phrase[:d] * (n // d) for d in range(1, n))


def trailing_loop(seq: Sequence[Hashable], max_phrase_len: int = 90, min_phrase_len: int = 3,
                  long_run: int = 50) -> tuple[int, int] | None:
  """The loop `seq` ends in, as (phrase length, copies), or None.

  Definition (after Holtzman et al. 2019, their `metrics/repetition.py`, same default
  thresholds): `seq` ends in a loop when its suffix is c >= 2 consecutive copies of a
  phrase of n items, 1 <= n <= `max_phrase_len`, that is not itself a repetition of a
  shorter phrase, and either n >= `min_phrase_len` or c > `long_run`. Short phrases need
  long runs because "very very" or "ha ha ha" are ordinary text. Among qualifying
  phrases the one with the most copies is returned (the shortest on ties).

  Holtzman et al.'s script first picks the phrase length with the most trailing copies
  and then applies the thresholds; the two differ only when a different phrase has at
  least as many copies, e.g. "x a a x a a" is a loop here ("x a a" twice) but not there
  ("a" also has two copies and is too short).
  """
  seq = list(seq)
  best = None
  for n in range(1, min(max_phrase_len, len(seq) // 2) + 1):
    phrase = seq[len(seq) - n:]
    copies = 1
    while (copies + 1) * n <= len(seq) and \
        seq[len(seq) - (copies + 1) * n:len(seq) - copies * n] == phrase:
      copies += 1
    if copies < 2 or not (n >= min_phrase_len or copies > long_run):
      continue
    if not _is_primitive(phrase):
      continue
    if best is None or copies > best[1]:
      best = (n, copies)
  return best


def repetition_share(generations: Iterable[Sequence[Hashable]], max_phrase_len: int = 90,
                     min_phrase_len: int = 3, long_run: int = 50) -> float:
  """Repetition % of Holtzman et al. (2019): share of generations that end in a loop.

  See `trailing_loop` for the definition and its parameters. Pass each generation
  without its prompt and cut before EOS. `nan` for no generations.
  """
  flags = [trailing_loop(g, max_phrase_len, min_phrase_len, long_run) is not None
           for g in generations]
  return sum(flags) / len(flags) if flags else math.nan


def _reference_windows(doc_words: Sequence[Sequence[str]], lengths: Sequence[int],
                       rng: np.random.Generator) -> list[list[str]]:
  """One pseudo-generation per length: non-overlapping contiguous runs of reference words.

  Each window is drawn uniformly among the places still free that lie inside one
  document, longest first (so that short windows do not break up the room long ones
  need), so its n-grams are n-grams of real text. A window that no free place inside a
  document can hold may cross a document boundary; one that no free place at all can
  hold (free words too fragmented) may overlap another. Needs sum(lengths) <= the
  number of reference words.
  """
  stream = [w for ws in doc_words for w in ws]
  doc = np.repeat(np.arange(len(doc_words)), [len(ws) for ws in doc_words])
  used = np.zeros(len(stream), bool)
  out = []
  for n in sorted((n for n in lengths if n > 0), reverse=True):
    starts = np.arange(len(stream) - n + 1)
    used_before = np.concatenate([[0], np.cumsum(used)])
    free = used_before[starts + n] == used_before[starts]
    ok = free & (doc[starts] == doc[starts + n - 1])
    if not ok.any():
      ok = free if free.any() else np.ones_like(free)
    start = int(rng.choice(np.flatnonzero(ok)))
    used[start:start + n] = True
    out.append(stream[start:start + n])
  return out


def _size_dependent(words_per_text: Sequence[Sequence[str]],
                    train_word_counter: Mapping[str, int], ngram_orders: Sequence[int],
                    zipf_top: int) -> dict[str, float]:
  """The metrics whose value depends on the number of words they are computed on."""
  counts = collections.Counter(w for ws in words_per_text for w in ws)
  out = {
      "unigram_entropy": unigram_entropy(counts),
      "unigram_kl": unigram_kl(counts, train_word_counter),
      "zipf": zipf_coefficient(counts, zipf_top),
  }
  for n in ngram_orders:
    out[f"distinct_{n}"] = distinct_n(words_per_text, n)
  return out


def summarize_text_metrics(generated_texts: Sequence[str],
                           generated_token_lists: Sequence[Sequence[int]] | None,
                           train_word_counter: Mapping[str, int],
                           reference_texts: Sequence[str] | None,
                           k: int = 20,
                           ngram_orders: Sequence[int] = (1, 2, 3, 4),
                           zipf_top: int = 5000,
                           max_phrase_len: int = 90,
                           hf_ks: Sequence[int] = (10, 20, 50, 100),
                           num_subsamples: int = 8,
                           seed: int = 0) -> dict[str, float]:
  """The text metrics of one run as a flat dict of floats (SPEC 9).

  Args:
    generated_texts: decoded generations (continuations, prompt removed).
    generated_token_lists: the same generations as model token ids, cut before EOS; the
      token-level metrics (`seq_rep_{n}`, `repetition_share`) are left out when None.
    train_word_counter: word counts of the training corpus (defines the top-k words
      and the KL reference).
    reference_texts: held-out human text (validation split); every report shows the
      high-frequency proportion on it beside the generated one (SPEC 9).
    k: number of top training words for the headline high-frequency proportion
      (`hf_proportion`).
    ngram_orders: n for distinct-n (words) and seq-rep-n (tokens).
    zipf_top: ranks used by the Zipf fit.
    max_phrase_len: longest loop phrase for the repetition share.
    hf_ks: the K of the extra high-frequency proportions `hf_proportion_k{K}`.
    num_subsamples: reference subsamples the size-matched reference metrics average over.
    seed: seed of those subsamples (the same seed gives the same values).

  Reference-text keys end in `_reference`. Distinct-n, unigram entropy, unigram KL and
  the Zipf coefficient depend on the number of words (a larger sample has more types
  and fewer distinct n-grams per n-gram), so on the reference they are computed on as
  many words as the generations hold: the reference is cut into pseudo-generations of
  the generations' word counts, contiguous runs of one document at random places
  (`_reference_windows`), and the values are averaged over `num_subsamples` such cuts;
  `num_words_reference` is the words in one cut. With fewer reference words than
  generated ones the whole reference is used once, as its documents, and
  `num_words_reference` < `num_words` shows it. The high-frequency proportions are
  proportions, with no size bias, and use every reference word. Length, generative
  entropy, effective rank and perplexity need model outputs and are computed by the
  caller (generation.py).
  """
  if num_subsamples < 1:
    raise ValueError(f"num_subsamples must be >= 1, got {num_subsamples}")
  gen_words_per_text = [words(t) for t in generated_texts]
  gen_words = [w for ws in gen_words_per_text for w in ws]
  tops = {kk: top_k_words(train_word_counter, kk) for kk in {k, *hf_ks}}

  def hf(ws: Sequence[str], suffix: str) -> dict[str, float]:
    res = {f"hf_proportion{suffix}": high_freq_proportion(ws, tops[k])}
    res.update({f"hf_proportion_k{kk}{suffix}": high_freq_proportion(ws, tops[kk])
                for kk in hf_ks})
    return res

  out: dict[str, float] = {
      "num_generations": float(len(generated_texts)),
      "num_words": float(len(gen_words)),
      **hf(gen_words, ""),
      **_size_dependent(gen_words_per_text, train_word_counter, ngram_orders, zipf_top),
  }
  if generated_token_lists is not None:
    for n in ngram_orders:
      out[f"seq_rep_{n}"] = seq_rep_n(generated_token_lists, n)
    out["repetition_share"] = repetition_share(generated_token_lists, max_phrase_len)
  if reference_texts is not None:
    ref_words_per_text = [words(t) for t in reference_texts]
    ref_words = [w for ws in ref_words_per_text for w in ws]
    out.update(hf(ref_words, "_reference"))
    lengths = [len(ws) for ws in gen_words_per_text]
    if len(ref_words) < sum(lengths):
      cuts = [ref_words_per_text]
    else:
      rng = np.random.default_rng(seed)
      cuts = [_reference_windows(ref_words_per_text, lengths, rng) for _ in range(num_subsamples)]
    out["num_words_reference"] = float(sum(len(ws) for ws in cuts[0]))
    values = [_size_dependent(c, train_word_counter, ngram_orders, zipf_top) for c in cuts]
    for name in values[0]:
      out[f"{name}_reference"] = float(np.mean([v[name] for v in values]))
  return out
