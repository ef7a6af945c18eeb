"""Model sizes and the configuration of the stochastic units, as frozen dataclasses.

Configuration is data: the launchers in `experiments/` turn flags into these objects,
the library never reads flags. `get_model_config(name, **overrides)` is the one way to
get a named size.

Every config dataclass of a run documents each field in its docstring's `Attributes:`
section (`name: text`, continued on more-indented lines; `a, b: text` documents two).
That text is the field's documentation and its flag's help (experiments/common.py makes
one flag per field); a field whose type is a `Literal` accepts exactly those values.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Literal

DMUMode = Literal["dmu2_prob", "dmu2_fix", "dprob", "dfix"]
DMU_MODES: tuple[str, ...] = typing.get_args(DMUMode)
DTUScores = Literal["key_norm", "uniform"]
DTU_SCORES: tuple[str, ...] = typing.get_args(DTUScores)
AttentionImpl = Literal["xla", "cudnn"]
ATTENTION_IMPLS: tuple[str, ...] = typing.get_args(AttentionImpl)
DType = Literal["float32", "bfloat16"]
DTYPES: tuple[str, ...] = typing.get_args(DType)


@dataclasses.dataclass(frozen=True)
class DMUConfig:
  """Dynamic MLP Unit (SPEC section 3, paper appendix B.3).

  Attributes:
    enabled: use the DMU as the MLP of every block.
    c_tilde: DMU retention c~ in (0, 1].
    mode: what is kept (SPEC 3): dmu2_prob / dmu2_fix (weight entries, i.i.d. or an exact
      count), dprob / dfix (input and output nodes, i.i.d. or an exact count).
    rescale: inverted scaling (1/c~ in training, identity at eval) instead of the paper's
      expectation c~(Wx + b) at eval.
  """

  enabled: bool = True
  c_tilde: float = 0.5
  mode: DMUMode = "dfix"
  rescale: bool = False

  def __post_init__(self):
    if not 0.0 < self.c_tilde <= 1.0:
      raise ValueError(f"c_tilde must be in (0, 1], got {self.c_tilde}")
    if self.mode not in DMU_MODES:
      raise ValueError(f"mode must be one of {', '.join(DMU_MODES)}, got {self.mode!r}")


@dataclasses.dataclass(frozen=True)
class DTUConfig:
  """Dynamic Transformer Unit (SPEC section 4, paper appendix B.4).

  Attributes:
    enabled: use the DTU as the self-attention of every block.
    keep: a3, the keys sampled per query (>= 1).
    scores: the compatibility scores c~_j keys are sampled by: key_norm (the L2 norm of
      the key, no gradient) or uniform.
    block_q: queries per block of the gathered computation (bounds its memory).
    attention: the kernel of full attention (the unit off, evaluation, keep >= T):
      xla, or cudnn (cuDNN flash attention: GPU, bfloat16/float16; a padding mask goes in
      as a bias; not measured here, no GPU was lent). Sampled attention and KV-cache
      decoding always use XLA.
  """

  enabled: bool = True
  keep: int = 32
  scores: DTUScores = "key_norm"
  block_q: int = 256
  attention: AttentionImpl = "xla"

  def __post_init__(self):
    if self.keep < 1:
      raise ValueError(f"keep must be >= 1, got {self.keep}")
    if self.scores not in DTU_SCORES:
      raise ValueError(f"scores must be one of {', '.join(DTU_SCORES)}, got {self.scores!r}")
    if self.block_q < 1:
      raise ValueError(f"block_q must be >= 1, got {self.block_q}")
    if self.attention not in ATTENTION_IMPLS:
      raise ValueError(f"attention must be one of {', '.join(ATTENTION_IMPLS)}, got "
                       f"{self.attention!r}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of a GPT-2 or BERT model.

  Attributes:
    name: the named size (a key of MODEL_CONFIGS).
    arch: 'gpt2' or 'bert'.
    vocab_size: vocabulary (a run replaces it by its tokenizer's).
    max_len: positions.
    num_layers, num_heads, d_model, d_ff: blocks, attention heads, width, MLP width.
    layer_norm_eps: LayerNorm epsilon.
    type_vocab_size: BERT's token-type vocabulary.
    dropout_rate: dropout after attention and MLP (0: none).
    dtype: compute dtype (parameters are always stored in float32).
    scan_layers: stack the blocks with nn.scan (compile time flat in depth; large models).
    remat: rematerialise each block in the backward pass (large models).
    dmu: the Dynamic MLP Unit of every block.
    dtu: the Dynamic Transformer Unit of every block.
  """

  name: str
  arch: str
  vocab_size: int
  max_len: int
  num_layers: int
  num_heads: int
  d_model: int
  d_ff: int
  layer_norm_eps: float = 1e-5
  type_vocab_size: int = 2
  dropout_rate: float = 0.0
  dtype: DType = "float32"
  scan_layers: bool = False
  remat: bool = False
  dmu: DMUConfig = DMUConfig(enabled=False)
  dtu: DTUConfig = DTUConfig(enabled=False)

  def __post_init__(self):
    if self.dtype not in DTYPES:
      raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}")

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
FeedbackForm = Literal["zero", "ema", "data", "psu_only"]
FEEDBACK_FORMS: tuple[str, ...] = typing.get_args(FeedbackForm)
Optimizer = Literal["adamw", "sgd"]
OPTIMIZERS: tuple[str, ...] = typing.get_args(Optimizer)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation, feedback loop (SPEC 5) and bookkeeping of one run.

  Attributes:
    steps: training steps.
    batch_size: global batch size (sequences).
    seq_len: sequence length (tokens).
    lr: peak learning rate (linear warmup, then cosine decay).
    warmup_steps: linear warmup steps.
    min_lr_ratio: the cosine decays to lr * min_lr_ratio.
    weight_decay: weight decay of the base optimizer.
    clip_norm: global gradient-norm clip.
    optimizer: the base optimizer: adamw, or sgd (plain SGD with L2 weight decay, the
      setting of Lemma 4.1).
    b1, b2: AdamW's moment decays.
    alpha: feedback strength alpha >= 0 (eq. 61); 0 is plain MLE. Also the PSU's
      confidence factor C_t = exp(-alpha H).
    feedback: how alpha enters training: zero = (alpha/2)(H - 0)^2; ema = (alpha/2)(H -
      sg(EMA(H)))^2; data = (alpha/2)(H - H_data)^2; psu_only = no loss term (alpha only
      in the PSU's confidence).
    feedback_target: H_data of feedback=data, nats per predicted token (None: the
      language's exact conditional entropy on synthetic data; required on text, e.g.
      the alpha=0 run's val_entropy).
    feedback_ema_decay: EMA decay of feedback=ema, in [0, 1) (0.9: about 10 steps).
    mlm_prob: BERT's masking rate (80/10/10).
    seed: seed of parameters, masks, PSU, data order and generation.
    mesh: device mesh, e.g. data=1,fsdp=-1,tensor=1 (-1: the remaining devices).
    eval_every: evaluate every N steps.
    eval_batches: validation batches per evaluation.
    checkpoint_every: checkpoint every N steps.
    keep_checkpoints: checkpoints kept.
    log_every: log metrics every N steps.
    lagged_metrics: read each step's metrics (loss check, progress bar, log) one step
      late, after the next step is dispatched, so the host does not wait for the device
      between steps; a non-finite loss then stops the run one step later. Off by default:
      not measured faster on CPU, not yet measured on GPU/TPU (benchmarks/loop.py).
  """

  steps: int = 300
  batch_size: int = 16
  seq_len: int = 64
  lr: float = 3e-3
  warmup_steps: int = 20
  min_lr_ratio: float = 0.1
  weight_decay: float = 0.01
  clip_norm: float = 1.0
  optimizer: Optimizer = "adamw"
  b1: float = 0.9
  b2: float = 0.95
  alpha: float = 0.0
  feedback: FeedbackForm = "zero"
  feedback_target: float | None = None
  feedback_ema_decay: float = 0.9
  mlm_prob: float = 0.15
  seed: int = 0
  mesh: str = "data=1,fsdp=-1,tensor=1"
  eval_every: int = 100
  eval_batches: int = 4
  checkpoint_every: int = 100
  keep_checkpoints: int = 3
  log_every: int = 1
  lagged_metrics: bool = False

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
    if not 0 <= self.seed < 2**31:  # an int32 argument of the jitted init
      raise ValueError(f"--seed must be in [0, 2^31), got {self.seed}")
    if not 0 < self.mlm_prob < 1:
      raise ValueError(f"--mlm_prob must be in (0, 1), got {self.mlm_prob}")
