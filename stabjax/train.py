"""The BAARA training step, the evaluation step and the sharded train state (SPEC section 7).

One step: forward with DMU/DTU masks -> loss = MLE + feedback (eq. 61) -> gradients ->
clip -> AdamW (or SGD) -> PSU (eq. 64, 69; its exact value V, eq. 65, is a second
forward on the same batch with the same DMU masks and DTU key sets) -> apply, with
nothing outside the step's sub-network changed (`optim.masked_step`) -> metrics.

The step is `jax.jit` with explicit in/out shardings on a ('data', 'fsdp', 'tensor') mesh;
the state is created already sharded from abstract shapes. Step randomness is
`fold_in(key, step)`, so a resumed run needs no extra RNG state.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from stabjax import feedback, optim, sharding
from stabjax.configs import ModelConfig, TrainConfig
from stabjax.data import DataConfig
from stabjax.degeneration import GenerationEvalConfig
from stabjax.models import get_model
from stabjax.models.dmu import touched_params
from stabjax.psu import PSUConfig, psu_metrics

# Flax collections a training forward writes: the DMU's masks (which weights the step
# used) and the DTU's key scores (which fix its key sets for the PSU's second forward).
STEP_COLLECTIONS = ("dmu_masks", "dtu_scores")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Everything that defines a run; written to the workdir as config.json.

  Attributes:
    model: shape and numerics, with the DMU and DTU settings.
    train: optimisation, feedback loop and bookkeeping.
    psu: the PSU decision layer.
    data: the data and its tokenizer.
    generation: the generation measured during and at the end of the run.
    init_from: a local Hugging Face checkpoint the run starts from (its weights replace
      the random init, its tokenizer tokenizes the data); None: random init. Recorded so
      that a resume with another checkpoint is refused (run.config_changes).
  """

  model: ModelConfig
  train: TrainConfig = TrainConfig()
  psu: PSUConfig = PSUConfig()
  data: DataConfig = DataConfig()
  generation: GenerationEvalConfig = GenerationEvalConfig()
  init_from: str | None = None


@flax.struct.dataclass
class StepScalars:
  """The run's scalar settings the train step takes as traced arguments, not as
  compile-time constants: runs that differ only in these (a sweep over alpha, the
  feedback target, the schedule or the seed, which enters through the state's keys) lower
  to the same program, so the persistent compilation cache compiles it once.

  Integer counts are carried as float32 (they only enter the schedule's arithmetic).
  `optimizer` is static: it picks the transformation's structure.
  """

  alpha: jax.Array
  feedback_target: jax.Array  # H_data of feedback=data (0 when unused)
  feedback_ema_decay: jax.Array
  lr: jax.Array
  min_lr_ratio: jax.Array
  warmup_steps: jax.Array
  steps: jax.Array
  weight_decay: jax.Array
  clip_norm: jax.Array
  b1: jax.Array
  b2: jax.Array
  optimizer: str = flax.struct.field(pytree_node=False, default="adamw")

  @classmethod
  def of(cls, t: TrainConfig) -> "StepScalars":
    f32 = lambda x: np.float32(x)  # noqa: E731
    return cls(alpha=f32(t.alpha), feedback_target=f32(t.feedback_target or 0.0),
               feedback_ema_decay=f32(t.feedback_ema_decay), lr=f32(t.lr),
               min_lr_ratio=f32(t.min_lr_ratio), warmup_steps=f32(t.warmup_steps),
               steps=f32(t.steps), weight_decay=f32(t.weight_decay),
               clip_norm=f32(t.clip_norm), b1=f32(t.b1), b2=f32(t.b2), optimizer=t.optimizer)


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: number of updates applied
  params: Any
  opt_state: Any
  key: jax.Array  # uint32[2]; step keys are fold_in(key, step)
  entropy_ema: jax.Array  # float32: biased EMA of H(B_t) (the 'ema' feedback form's state)


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  """Token ids the losses need (from the tokenizer)."""

  pad: int
  bos: int
  eos: int
  mask: int


# ----------------------------------------------------------------------------- losses


def _token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def _masked_mean(x: jax.Array, m: jax.Array) -> jax.Array:
  m = m.astype(jnp.float32)
  return jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)


def mlm_corrupt(key: jax.Array, tokens: jax.Array, mask: jax.Array, ids: SpecialIds,
                vocab_size: int, prob: float) -> tuple[jax.Array, jax.Array]:
  """BERT masking: `prob` of the real tokens but BOS; of those 80% [MASK], 10% random, 10% kept.

  EOS is a target like any word, so a BERT model learns where text ends and its
  mask-predict generations can end (without it no generation ever emitted EOS).
  """
  k_sel, k_kind, k_rand = jax.random.split(key, 3)
  special = (tokens == ids.pad) | (tokens == ids.bos)
  selected = jax.random.bernoulli(k_sel, prob, tokens.shape) & (mask > 0) & ~special
  kind = jax.random.uniform(k_kind, tokens.shape)
  random_tokens = jax.random.randint(k_rand, tokens.shape, 0, vocab_size, tokens.dtype)
  inputs = jnp.where(selected & (kind < 0.8), ids.mask, tokens)
  inputs = jnp.where(selected & (kind >= 0.8) & (kind < 0.9), random_tokens, inputs)
  return inputs, selected


def make_loss_fn(model: nn.Module, model_cfg: ModelConfig, train_cfg: TrainConfig, ids: SpecialIds):
  """loss_fn(params, batch, key, deterministic=False, frozen=None, setpoint=0., weight=1.,
  alpha=train_cfg.alpha) -> (loss, aux) for GPT-2 (next token) or BERT (MLM).

  loss = NLL + weight * (alpha / 2) (H(B_t) - setpoint)^2 for the feedback forms with a
  loss term (`feedback_setpoint` gives setpoint and weight); NLL alone for 'psu_only'.
  alpha may be traced: at alpha = 0 the term and its gradient are exact zeros, and the
  loss and gradient equal plain MLE's bit for bit (tested). aux holds nll, entropy, nll_sum,
  entropy_sum, tokens and `collections`: what the forward wrote to `STEP_COLLECTIONS`.
  Passing those back as `frozen` (with the same key) replays the forward with the same
  DMU masks and DTU key sets at other parameters.
  """
  has_term = train_cfg.feedback != "psu_only"

  def loss_fn(params, batch, key, deterministic=False, frozen=None, setpoint=0.0, weight=1.0,
              alpha=train_cfg.alpha):
    tokens, mask = batch["tokens"], batch["mask"]
    k_dmu, k_dtu, k_drop, k_mlm = jax.random.split(key, 4)
    rngs = {"dmu": k_dmu, "dtu": k_dtu, "dropout": k_drop}
    variables = {"params": params, **(frozen or {})}
    mutable = [] if frozen is not None or deterministic else list(STEP_COLLECTIONS)
    if model_cfg.causal:
      inputs, kw = tokens, {}
    else:
      inputs, weights = mlm_corrupt(k_mlm, tokens, mask, ids, model_cfg.vocab_size,
                                    train_cfg.mlm_prob)
      kw = {"attention_mask": mask}
    logits, collections = model.apply(variables, inputs, deterministic=deterministic,
                                      rngs=rngs, mutable=mutable, **kw)
    if model_cfg.causal:
      logits, targets, weights = logits[:, :-1], tokens[:, 1:], mask[:, 1:]
    else:
      targets = tokens
    nll_tokens = _token_nll(logits, targets)
    nll = _masked_mean(nll_tokens, weights)
    entropy = feedback.predictive_entropy(logits, weights)
    loss = nll
    if has_term:
      loss = nll + weight * feedback.feedback_loss(entropy, alpha, setpoint)
    tokens = jnp.sum(weights.astype(jnp.float32))
    aux = {"nll": nll, "entropy": entropy, "nll_sum": jnp.sum(nll_tokens * weights),
           "entropy_sum": entropy * tokens, "tokens": tokens, "collections": dict(collections)}
    return loss, aux

  return loss_fn


def feedback_setpoint(train_cfg: TrainConfig, step: jax.Array, entropy_ema: jax.Array,
                      scalars: StepScalars) -> tuple[jax.Array, jax.Array]:
  """(setpoint, weight) of the feedback term at `step` (see `configs.FEEDBACK_FORMS`).

  'zero': (0, 1). 'data': (H_data, 1). 'ema': the bias-corrected EMA of H(B_t) over the
  steps before this one (a constant here, so the gradient moves H toward it from either
  side and never moves the average itself), with weight 0 at step 0, which has no
  average yet. 'psu_only' has no term (the values are unused). The form is static; H_data
  and the decay come from the (traced) `scalars`.
  """
  one = jnp.ones((), jnp.float32)
  if train_cfg.feedback == "data":
    return jnp.asarray(scalars.feedback_target, jnp.float32), one
  if train_cfg.feedback == "ema":
    seen = step.astype(jnp.float32)
    debias = 1.0 - jnp.power(jnp.asarray(scalars.feedback_ema_decay, jnp.float32), seen)
    return entropy_ema / jnp.maximum(debias, 1e-12), (step > 0).astype(jnp.float32)
  return jnp.zeros((), jnp.float32), one


# ------------------------------------------------------------------------ the system

# TrainConfig fields no jitted function holds as a constant: the traced `StepScalars`, the
# seed (an argument of init) and the loop's bookkeeping.
_NOT_IN_PROGRAM = tuple(f.name for f in dataclasses.fields(StepScalars)
                        if f.name != "optimizer") + (
    "seed", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints", "log_every",
    "lagged_metrics")


def static_train_config(t: TrainConfig) -> TrainConfig:
  """`t` with the fields that do not enter the compiled programs at their defaults: two
  runs with equal static configs (and model, PSU, ids, mesh) share their jitted functions."""
  default = TrainConfig()
  return dataclasses.replace(t, **{k: getattr(default, k) for k in _NOT_IN_PROGRAM})


@dataclasses.dataclass(frozen=True)
class _Jitted:
  """The jitted functions of one shape and static setting, and what they were built from."""

  model: nn.Module
  abstract_params: Any
  abstract_state: Any
  param_shardings: Any
  state_shardings: Any
  c_tilde: float
  init: Callable  # (seed, scalars) -> TrainState
  init_from: Callable  # (params, seed, scalars) -> TrainState
  train: Callable  # (state, batch, neg_log_freq, scalars) -> (state, metrics)
  eval: Callable  # (params, batch, key) -> sums


@functools.lru_cache(maxsize=8)
def _jitted(model_cfg: ModelConfig, t: TrainConfig, psu_cfg: PSUConfig, ids: SpecialIds,
            mesh: jax.sharding.Mesh) -> _Jitted:
  """Builds (once per process and key) the sharded, jitted init, train and eval steps.
  `t` is a `static_train_config`: everything run-specific is an argument."""
  model = get_model(model_cfg)
  dummy = jnp.zeros((1, t.seq_len), jnp.int32)

  def init_params(key):
    return model.init({"params": key}, dummy, deterministic=True)["params"]

  keys = lambda seed: jax.random.split(jax.random.PRNGKey(seed))  # noqa: E731
  seed0, scalars0 = np.int32(0), StepScalars.of(t)
  abstract_boxed = jax.eval_shape(lambda s: init_params(keys(s)[0]), seed0)
  abstract_params = nn.unbox(abstract_boxed)
  units = model_cfg
  if psu_cfg.c_tilde_from == "full":
    units = units.replace(dmu=dataclasses.replace(units.dmu, enabled=True),
                          dtu=dataclasses.replace(units.dtu, enabled=True))
  c_tilde = feedback.learning_complexity(units, t.seq_len)

  def init_from_params(params, seed, sc: StepScalars):
    opt_state = optim.make_optimizer(sc, psu_cfg, c_tilde, seed=seed).init(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                      key=keys(seed)[1], entropy_ema=jnp.zeros((), jnp.float32))

  def init_fn(seed, sc: StepScalars):
    return init_from_params(nn.unbox(init_params(keys(seed)[0])), seed, sc)

  abstract_state = jax.eval_shape(init_fn, seed0, scalars0)
  param_sh = sharding.logical_shardings(abstract_boxed, mesh)
  repl = sharding.replicated(mesh)
  opt_sh = optim.map_params_like(lambda _: param_sh, jax.tree.structure(abstract_params),
                                 abstract_state.opt_state, other=lambda _: repl)
  state_sh = TrainState(step=repl, params=param_sh, opt_state=opt_sh, key=repl,
                        entropy_ema=repl)
  batch_sh = sharding.batch_sharding(mesh)
  loss_fn = make_loss_fn(model, model_cfg, t, ids)

  def train_step(state: TrainState, batch: dict, neg_log_freq: jax.Array, sc: StepScalars):
    key = jax.random.fold_in(state.key, state.step)
    setpoint, weight = feedback_setpoint(t, state.step, state.entropy_ema, sc)
    fb = dict(setpoint=setpoint, weight=weight, alpha=sc.alpha)
    tx = optim.make_optimizer(sc, psu_cfg, c_tilde, seed=0)  # the seed only enters init
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, key,
                                                                  **fb)
    collections = {k: v for k, v in aux["collections"].items() if v}
    # L(.; B_t) with this step's DMU masks, DTU key sets and setpoint, for the PSU's V (eq. 65).
    value_fn = lambda p: loss_fn(p, batch, key, frozen=collections, **fb)[0]
    updates, opt_state = tx.update(
        grads, state.opt_state, state.params, value=loss, grad=grads, value_fn=value_fn,
        entropy=aux["entropy"],
        rarity=feedback.token_rarity(batch["tokens"], batch["mask"], neg_log_freq),
        touched=touched_params(state.params, collections.get("dmu_masks", {})))
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "nll": aux["nll"], "entropy": aux["entropy"],
               "grad_norm": optax.tree.norm(grads), "update_norm": optax.tree.norm(updates),
               "tokens": aux["tokens"]}
    if t.feedback in ("ema", "data"):
      metrics["feedback/setpoint"] = setpoint
    metrics.update({f"psu/{k}": v for k, v in psu_metrics(opt_state).items()})
    metrics["lr"] = optim.lr_schedule(sc)(state.step)  # in the step: no host ops per step
    d = sc.feedback_ema_decay
    ema = d * state.entropy_ema + (1.0 - d) * jax.lax.stop_gradient(aux["entropy"])
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         entropy_ema=ema), metrics

  def eval_step(params, batch, key):
    # A Python alpha = 0: no term, so the program is the same for every alpha.
    _, aux = loss_fn(params, batch, key, deterministic=True, alpha=0.0)
    return {k: aux[k] for k in ("nll_sum", "entropy_sum", "tokens")}

  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    return _Jitted(
        model=model, abstract_params=abstract_params, abstract_state=abstract_state,
        param_shardings=param_sh, state_shardings=state_sh, c_tilde=c_tilde,
        init=jax.jit(init_fn, in_shardings=(repl, repl), out_shardings=state_sh),
        init_from=jax.jit(init_from_params, in_shardings=(param_sh, repl, repl),
                          out_shardings=state_sh),
        train=jax.jit(train_step, in_shardings=(state_sh, batch_sh, repl, repl),
                      out_shardings=(state_sh, repl), donate_argnums=(0,)),
        eval=jax.jit(eval_step, in_shardings=(param_sh, batch_sh, repl), out_shardings=repl))


@dataclasses.dataclass
class Trainer:
  """The jitted, sharded functions of one run. Build with `Trainer.create`."""

  cfg: RunConfig
  model: nn.Module
  mesh: jax.sharding.Mesh
  state_shardings: Any
  abstract_state: Any
  init_state: Callable[[], TrainState]
  train_step: Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]
  eval_step: Callable[[Any, dict, jax.Array], dict]
  c_tilde: float
  scalars: StepScalars  # the run's traced scalars, passed to every train step
  jit_train_step: Any  # train_step's jitted function: (state, batch, neg_log_freq, scalars)

  @classmethod
  def create(cls, cfg: RunConfig, ids: SpecialIds, mesh: jax.sharding.Mesh | None = None,
             init_params: Any = None) -> "Trainer":
    """`init_params` (an unboxed params tree, e.g. `models.hf.load_params` of
    `cfg.init_from`) replaces the random init of `init_state`: shapes checked against the
    model, placed with the random init's shardings.

    The jitted functions are shared by every Trainer of this process with the same shape
    and static settings (`_jitted`): a sweep's later runs neither trace nor compile again.
    """
    mesh = sharding.make_mesh(cfg.train.mesh) if mesh is None else mesh
    t = cfg.train
    if t.batch_size % sharding.data_parallel_size(mesh):
      raise ValueError(
          f"--batch_size={t.batch_size} is not divisible by the {sharding.data_parallel_size(mesh)} "
          f"data-parallel devices (mesh data x fsdp); accepted: a multiple of "
          f"{sharding.data_parallel_size(mesh)}")
    if t.feedback == "data" and t.feedback_target is None:
      raise ValueError("--feedback=data needs its setpoint H_data: pass --feedback_target "
                       "(run.resolve_feedback_target fills it in on synthetic data)")
    j = _jitted(cfg.model, static_train_config(t), cfg.psu, ids, mesh)
    if init_params is not None:
      from stabjax.models.hf import check_shapes
      check_shapes(init_params, j.abstract_params, cfg.model.name)
    repl = sharding.replicated(mesh)
    seed, scalars = np.int32(t.seed), jax.device_put(StepScalars.of(t), repl)

    def under_mesh(f):
      @functools.wraps(f)
      def wrapped(*a):
        with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
          return f(*a)
      return wrapped

    jit_init = lambda: j.init(seed, scalars)  # noqa: E731
    if init_params is not None:
      # Passed in, not closed over: the weights stay arguments, never jit constants.
      host_params = jax.tree.map(lambda x, s: np.asarray(x, s.dtype), init_params,
                                 j.abstract_params)
      jit_init = lambda: j.init_from(  # noqa: E731
          jax.device_put(host_params, j.param_shardings), seed, scalars)
    return cls(cfg=cfg, model=j.model, mesh=mesh, state_shardings=j.state_shardings,
               abstract_state=j.abstract_state, init_state=under_mesh(jit_init),
               train_step=under_mesh(lambda state, batch, freq: j.train(state, batch, freq,
                                                                        scalars)),
               eval_step=under_mesh(j.eval), c_tilde=j.c_tilde, scalars=scalars,
               jit_train_step=j.train)

  def put_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """A process's rows of the global batch -> global arrays sharded over the batch axes."""
    sh = sharding.batch_sharding(self.mesh)
    return {k: jax.make_array_from_process_local_data(sh, np.asarray(v))
            for k, v in local_batch.items()}

  def lower_train_step(self):
    """Lower the train step from abstract shapes only (no allocation): for memory reports."""
    t = self.cfg.train
    batch = {k: jax.ShapeDtypeStruct((t.batch_size, t.seq_len), jnp.int32,
                                     sharding=sharding.batch_sharding(self.mesh))
             for k in ("tokens", "mask")}
    state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                         self.abstract_state, self.state_shardings)
    freq = jax.ShapeDtypeStruct((self.cfg.model.vocab_size,), jnp.float32,
                                sharding=sharding.replicated(self.mesh))
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
      return self.jit_train_step.lower(state, batch, freq, self.scalars)


