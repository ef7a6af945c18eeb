"""Degeneration metrics (SPEC section 9): text, generation process, across runs, synthetic."""

from __future__ import annotations

from stabjax.metrics.aggregate import convergence_step
from stabjax.metrics.aggregate import cross_seed_summary
from stabjax.metrics.aggregate import top_word_overlap
from stabjax.metrics.generation import effective_rank
from stabjax.metrics.generation import generation_lengths
from stabjax.metrics.generation import generative_entropy
from stabjax.metrics.generation import length_stats
from stabjax.metrics.generation import perplexity
from stabjax.metrics.generation import predictive_entropy
from stabjax.metrics.synthetic import empirical_entropy
from stabjax.metrics.synthetic import forward_kl
from stabjax.metrics.synthetic import mle_loss
from stabjax.metrics.synthetic import model_entropy_mc
from stabjax.metrics.synthetic import sequence_logprob
from stabjax.metrics.synthetic import support_mass
from stabjax.metrics.synthetic import synthetic_metrics
from stabjax.metrics.text import distinct_n
from stabjax.metrics.text import high_freq_proportion
from stabjax.metrics.text import repetition_share
from stabjax.metrics.text import seq_rep_n
from stabjax.metrics.text import summarize_text_metrics
from stabjax.metrics.text import top_k_words
from stabjax.metrics.text import trailing_loop
from stabjax.metrics.text import unigram_entropy
from stabjax.metrics.text import unigram_kl
from stabjax.metrics.text import words
from stabjax.metrics.text import zipf_coefficient
