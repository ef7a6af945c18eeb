"""Model sizes and the configuration of the stochastic units, as frozen dataclasses.

Configuration is data: the launchers in `experiments/` turn flags into these objects,
the library never reads flags. `get_model_config(name, **overrides)` is the one way to
get a named size.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

DMUMode = Literal["dmu2_prob", "dmu2_fix", "dprob", "dfix"]
DMU_MODES: tuple[str, ...] = ("dmu2_prob", "dmu2_fix", "dprob", "dfix")
DTU_SCORES: tuple[str, ...] = ("key_norm", "uniform")


@dataclasses.dataclass(frozen=True)
class DMUConfig:
  """Dynamic MLP Unit (SPEC section 3, paper appendix B.3)."""

  enabled: bool = True
  c_tilde: float = 0.5  # retention in (0, 1]
  mode: str = "dfix"  # one of DMU_MODES
  rescale: bool = False  # True: inverted scaling (1/c~ in training, identity at eval)

  def __post_init__(self):
    if not 0.0 < self.c_tilde <= 1.0:
      raise ValueError(f"c_tilde must be in (0, 1], got {self.c_tilde}")
    if self.mode not in DMU_MODES:
      raise ValueError(f"dmu mode must be one of {', '.join(DMU_MODES)}, got {self.mode!r}")


@dataclasses.dataclass(frozen=True)
class DTUConfig:
  """Dynamic Transformer Unit (SPEC section 4, paper appendix B.4)."""

  enabled: bool = True
  keep: int = 32  # a3: keys sampled per query
  scores: str = "key_norm"  # one of DTU_SCORES
  block_q: int = 256  # queries per block in the gathered computation (memory bound)

  def __post_init__(self):
    if self.keep < 1:
      raise ValueError(f"dtu keep must be >= 1, got {self.keep}")
    if self.scores not in DTU_SCORES:
      raise ValueError(f"dtu scores must be one of {', '.join(DTU_SCORES)}, got {self.scores!r}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of a GPT-2 or BERT model.

  `dtype` is the compute dtype; parameters are always stored in float32.
  """

  name: str
  arch: str  # "gpt2" or "bert"
  vocab_size: int
  max_len: int
  num_layers: int
  num_heads: int
  d_model: int
  d_ff: int
  layer_norm_eps: float = 1e-5
  type_vocab_size: int = 2  # BERT only
  dropout_rate: float = 0.0
  dtype: str = "float32"
  scan_layers: bool = False  # stack blocks with nn.scan (compile time flat in depth)
  remat: bool = False  # rematerialise each block in the backward pass
  dmu: DMUConfig = DMUConfig(enabled=False)
  dtu: DTUConfig = DTUConfig(enabled=False)

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def causal(self) -> bool:
    return self.arch == "gpt2"

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)


GPT2_VOCAB = 50257
BERT_VOCAB = 30522


def _gpt2(name, d, layers, heads, vocab=GPT2_VOCAB, max_len=1024):
  return ModelConfig(name=name, arch="gpt2", vocab_size=vocab, max_len=max_len,
                     num_layers=layers, num_heads=heads, d_model=d, d_ff=4 * d,
                     layer_norm_eps=1e-5)


def _bert(name, d, layers, heads, vocab=BERT_VOCAB, max_len=512):
  return ModelConfig(name=name, arch="bert", vocab_size=vocab, max_len=max_len,
                     num_layers=layers, num_heads=heads, d_model=d, d_ff=4 * d,
                     layer_norm_eps=1e-12)


MODEL_CONFIGS: dict[str, ModelConfig] = {
    c.name: c
    for c in [
        # CPU / test sizes; the vocabulary is normally replaced by the tokenizer's.
        # nano / tiny / mini are about 4x apart in parameters at a 2048-token vocabulary
        # (0.30M / 1.08M / 4.5M): the CPU scale trend (experiments/scale.py).
        _gpt2("gpt2_nano", 64, 3, 2, vocab=4096, max_len=256),
        _gpt2("gpt2_tiny", 128, 4, 4, vocab=4096, max_len=256),
        _gpt2("gpt2_mini", 256, 5, 4, vocab=4096, max_len=256),
        _bert("bert_tiny", 128, 2, 2, vocab=4096, max_len=256),
        # Published GPT-2 shapes.
        _gpt2("gpt2_small", 768, 12, 12),
        _gpt2("gpt2_medium", 1024, 24, 16),
        _gpt2("gpt2_large", 1280, 36, 20),
        _gpt2("gpt2_xl", 1600, 48, 25),
        # The paper's sizes (it gives no shapes; these are ours, head_dim 128).
        _gpt2("gpt2_1b", 2048, 18, 16),   # ~1.01e9
        _gpt2("gpt2_2b", 2560, 24, 20),   # ~2.02e9
        _gpt2("gpt2_3b", 2560, 36, 20),   # ~2.96e9
        _bert("bert_base", 768, 12, 12),
        _bert("bert_1b", 2048, 18, 16),   # ~0.97e9
    ]
}


def get_model_config(name: str, **overrides) -> ModelConfig:
  """The named size, with fields replaced by `overrides` (e.g. vocab_size=...)."""
  if name not in MODEL_CONFIGS:
    raise ValueError(f"unknown model {name!r}; accepted: {', '.join(MODEL_CONFIGS)}")
  return dataclasses.replace(MODEL_CONFIGS[name], **overrides)


# How alpha enters training (issue 12: stabilisation vs entropy minimisation):
#   zero      (alpha/2) (H - 0)^2: pulls the entropy down (SPEC 5's reading of eq. 61)
#   ema       (alpha/2) (H - sg(EMA(H)))^2: damps H's fluctuation around its own running
#             average without pulling its level (stabilisation in the control sense)
#   data      (alpha/2) (H - H_data)^2: a setpoint at the data's own entropy
#   psu_only  no loss term; alpha only sets the PSU's confidence C_t = exp(-alpha H)
# Every form also gives the PSU its alpha.
FEEDBACK_FORMS: tuple[str, ...] = ("zero", "ema", "data", "psu_only")
OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation, feedback loop (SPEC 5) and bookkeeping of one run."""

  steps: int = 300
  batch_size: int = 16  # global batch
  seq_len: int = 64
  lr: float = 3e-3
  warmup_steps: int = 20
  min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
  weight_decay: float = 0.01
  clip_norm: float = 1.0
  optimizer: str = "adamw"  # one of OPTIMIZERS; sgd: plain SGD + L2 decay (Lemma 4.1)
  b1: float = 0.9
  b2: float = 0.95
  alpha: float = 0.0  # feedback strength (eq. 61); also the PSU confidence factor
  feedback: str = "zero"  # one of FEEDBACK_FORMS
  feedback_target: float | None = None  # H_data of the 'data' form (None: from the data)
  feedback_ema_decay: float = 0.9  # EMA decay of the 'ema' form (about 10 steps)
  mlm_prob: float = 0.15  # BERT masking rate (80/10/10)
  seed: int = 0
  mesh: str = "data=1,fsdp=-1,tensor=1"
  eval_every: int = 100
  eval_batches: int = 4
  checkpoint_every: int = 100
  keep_checkpoints: int = 3
  log_every: int = 1

  def __post_init__(self):
    if self.alpha < 0:
      raise ValueError(f"--alpha must be >= 0, got {self.alpha}")
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
    if self.feedback not in FEEDBACK_FORMS:
      raise ValueError(f"--feedback must be one of {', '.join(FEEDBACK_FORMS)}, got {self.feedback!r}")
    if self.feedback_target is not None and self.feedback != "data":
      raise ValueError(f"--feedback_target is the setpoint of --feedback=data only, got it with "
                       f"--feedback={self.feedback}")
    if self.feedback_target is not None and not self.feedback_target >= 0:
      raise ValueError(f"--feedback_target must be an entropy >= 0 (nats), got {self.feedback_target}")
    if not 0.0 <= self.feedback_ema_decay < 1.0:
      raise ValueError(f"--feedback_ema_decay must be in [0, 1), got {self.feedback_ema_decay}")
    for name in ("steps", "batch_size", "eval_every", "eval_batches", "checkpoint_every",
                 "keep_checkpoints", "log_every"):
      if getattr(self, name) < 1:
        raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
    if self.seq_len < 2:
      raise ValueError(f"--seq_len must be >= 2, got {self.seq_len}")
    if self.lr <= 0:
      raise ValueError(f"--lr must be > 0, got {self.lr}")
    if not 0 < self.mlm_prob < 1:
      raise ValueError(f"--mlm_prob must be in (0, 1), got {self.mlm_prob}")
