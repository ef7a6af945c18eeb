"""PSU, Predictive Selective Update (paper appendix B.2, Alg. 1; SPEC 6), as optax.

`psu(...)` is an `optax.GradientTransformationExtraArgs` that follows a base optimizer,

    tx = optax.chain(optax.clip_by_global_norm(c), optax.adamw(schedule),
                     psu(config, alpha=alpha, c_tilde=c_tilde))
    updates, opt_state = tx.update(grads, opt_state, params, value=loss, grad=grads,
                                   value_fn=loss_at, entropy=entropy, rarity=rarity)

and turns the base optimizer's update u into (eq. 64, 69)

    u' = gamma_b * eta_mod * P_S(u),     eta_mod = (2 / pi) * arctan(a~ / c~),

where the action a_b = (gamma_b, S_b) is sampled from a small policy pi_phi(a | s_b):
gamma_b, the precision factor, from a Gaussian on log gamma clipped to [gamma_min,
gamma_max]; S_b, the active subspace, one Bernoulli per parameter group (P_S zeroes the
update of inactive groups). The policy is trained by REINFORCE on the reward (eq. 65-68)

    V(B_t)  = L(theta_t; B_t) - L(theta_{t+1}; B_t)                              (65)
    V-bar_t = mean of V over the last Delta steps                                 (66)
    C_t     = exp(-alpha * H(B_t))                                               (67)
    r_t     = V-bar_t * C_t - lambda * (gamma_t - 1)^2                            (68)

Where SPEC 6 interprets the paper:
  * Eq. 64 scales the learning rate eta_0; here it scales the base optimizer's update,
    which is the same for SGD and the natural reading for AdamW.
  * a~ (eq. 62) divides the grad norm by a max over all parameters, which is not
    computable; it is the grad norm over its running max (optionally decayed).
  * c~ (eq. 63) is the analytic DMU/DTU compute fraction (`feedback.learning_complexity`).
  * Eq. 68 writes lambda (s_t - 1)^2; s_t is read as the precision factor gamma_t.
  * Alg. 1 line 4 writes gamma_b pi_phi grad L; we apply eq. 69 with eta_mod of eq. 64.
  * V is measured within the step: exactly, by calling `value_fn` (the same batch,
    DMU masks and DTU key sets) at theta_t + u' ('exact', as optax's backtracking line
    search evaluates its candidate), or to first order as -<grad, u'> ('linear').
  * V-bar over the first Delta - 1 steps is the mean of the values seen so far.
  * The paper's "periodically update phi by maximizing expected reward" is, every K
    steps, `policy_steps` Adam steps of REINFORCE on the replay buffer's entries of
    the current policy, with a moving-average baseline, advantages divided by the
    rewards' running std, and PPO's ratio clip for the steps after the first.
  * The paper's argument for Theorem B.1 (eq. 70) takes E[V] ~ 0 on a pure-noise batch,
    but V of eq. 65 is measured on the batch just stepped on, so E[V] > 0 there too
    (the step fits the batch's noise). The learned gamma is lower on noisy batches only
    when C_t suppresses their reward enough: alpha * (H_noisy - H_informative) must
    exceed about log(V_noisy / V_informative). See tests/test_psu.py.

Everything lives in the optax state (a `PSUState`), so the transformation is pure,
jittable and checkpointable; the policy update is a `lax.cond` inside the same jit.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Literal, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from stabjax.feedback import group_fisher, param_groups

PyTree = Any

# The state features s_b, in SPEC 6 order.
FEATURE_NAMES: tuple[str, ...] = (
    "loss", "loss_minus_ema", "log_grad_norm", "a_tilde", "c_tilde", "rarity", "entropy",
    "mean_log_fisher")
NUM_FEATURES = len(FEATURE_NAMES)
ValueMode = Literal["exact", "linear"]
VALUE_MODES: tuple[str, ...] = typing.get_args(ValueMode)
Baseline = Literal["moving_average", "features"]
BASELINES: tuple[str, ...] = typing.get_args(Baseline)
CTildeFrom = Literal["run", "full"]
C_TILDE_FROM: tuple[str, ...] = typing.get_args(CTildeFrom)


@dataclasses.dataclass(frozen=True)
class PSUConfig:
  """Configuration of the PSU (SPEC 6). The paper gives no values; these are ours.

  Attributes:
    enabled: False makes `psu` exactly the identity on updates (`--psu=false`).
    gamma_min, gamma_max: the clip range of the precision factor gamma.
    init_log_std: initial std of log gamma (the policy's exploration).
    min_log_std, max_log_std: the range the learned log std is clipped to.
    init_active_logit: initial logit of every group's Bernoulli (3 -> 95% active).
    hidden: width of the policy MLP's hidden layer.
    buffer_size: replay buffer entries (the most recent steps); >= update_every.
    delta: Delta, the window of the smoothed value V-bar (eq. 66). Default 1 (no
      smoothing): V-bar_t mixes the values of Delta - 1 earlier batches, which do not
      depend on the action a_t, into r_t. That only adds variance to the policy
      gradient, and on heterogeneous batches it drowned the signal (tests/test_psu.py).
    update_every: K, steps between policy updates.
    policy_steps: Adam steps on the policy objective per update.
    policy_lr: Adam learning rate of the policy.
    penalty: lambda of eq. 68. The reward is in loss units, so lambda sets how much
      loss decrease per step a gamma away from 1 must buy; scale it with typical |V|.
    baseline: 'moving_average' (SPEC 6): advantage = r - an exponential moving average
      of the rewards. 'features' (an addition, not in the paper): also subtract a
      linear function of the state features, fitted on the same entries (a learned
      state-dependent baseline; lower variance where batch types differ in reward).
    baseline_decay: decay of the moving-average reward baseline.
    normalize_advantage: divide advantages by the running std of the rewards (and clip
      them to +-advantage_clip), which makes `policy_lr` independent of the loss scale.
    advantage_clip: see normalize_advantage.
    ratio_clip: the PPO clip of the ratio pi_phi / pi_old in the policy objective
      (see `reinforce_loss`).
    max_policy_age: a policy update uses the entries sampled at most this many policy
      updates ago. 0 is on-policy REINFORCE: only the decisions of the current policy
      (the last K steps). Older entries enter through the clipped importance ratio.
    value: 'exact' (V = value - value_fn(theta + u'), the `value_fn` extra arg at the
      stepped parameters) or 'linear' (V = -<grad, u'>, no second forward).
    learn: False freezes the policy (no policy updates).
    stochastic: False takes the policy's mean action (gamma = exp(mean), S = {p > 1/2}).
    feature_decay: EMA decay of the running mean/variance that normalise the features.
    loss_ema_decay: EMA decay of the loss in the feature "loss minus its EMA".
    grad_max_decay: a~'s normaliser, the running max of the grad norm, decays by this
      factor per step before the max is taken (1.0 = a plain running max, which the
      large warm-up gradients fix for the whole run; see README "PSU schedule").
    c_tilde_from: whose c~ (eq. 63) the caller passes to `psu`: 'run', the analytic
      compute fraction of the run's own model, or 'full', that of the same model with
      both DMU and DTU on (their configured settings). The ablation's variants use
      'full', so that each differs from the full model only in the unit it removes (and
      not also in eta_mod = (2/pi) arctan(a~/c~)).
    feature_clip: normalised features are clipped to [-feature_clip, feature_clip].
  """

  enabled: bool = True
  gamma_min: float = 0.5
  gamma_max: float = 2.0
  init_log_std: float = -1.0
  min_log_std: float = -5.0
  max_log_std: float = 1.0
  init_active_logit: float = 3.0
  hidden: int = 32
  buffer_size: int = 64
  delta: int = 1
  update_every: int = 16
  policy_steps: int = 4
  policy_lr: float = 3e-3
  penalty: float = 1e-3
  baseline: Baseline = "moving_average"
  baseline_decay: float = 0.9
  normalize_advantage: bool = True
  advantage_clip: float = 5.0
  ratio_clip: float = 0.2
  max_policy_age: int = 0
  value: ValueMode = "exact"
  learn: bool = True
  stochastic: bool = True
  feature_decay: float = 0.99
  loss_ema_decay: float = 0.95
  grad_max_decay: float = 0.95
  feature_clip: float = 5.0
  c_tilde_from: CTildeFrom = "run"

  def __post_init__(self):
    if not 0.0 < self.gamma_min <= 1.0 <= self.gamma_max:
      raise ValueError(f"need 0 < gamma_min <= 1 <= gamma_max, got {self.gamma_min}, "
                       f"{self.gamma_max}")
    if self.value not in VALUE_MODES:
      raise ValueError(f"value must be one of {', '.join(VALUE_MODES)}, got {self.value!r}")
    if self.baseline not in BASELINES:
      raise ValueError(f"baseline must be one of {', '.join(BASELINES)}, "
                       f"got {self.baseline!r}")
    for name in ("hidden", "delta", "update_every", "policy_steps"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.buffer_size < max(2, self.update_every):
      raise ValueError(f"buffer_size must be >= max(2, update_every), got {self.buffer_size}")
    if not self.min_log_std <= self.init_log_std <= self.max_log_std:
      raise ValueError("need min_log_std <= init_log_std <= max_log_std")
    if self.max_policy_age < 0:
      raise ValueError(f"max_policy_age must be >= 0, got {self.max_policy_age}")
    if not 0.0 < self.grad_max_decay <= 1.0:
      raise ValueError(f"grad_max_decay must be in (0, 1], got {self.grad_max_decay}")
    if self.c_tilde_from not in C_TILDE_FROM:
      raise ValueError(f"c_tilde_from must be one of {', '.join(C_TILDE_FROM)}, "
                       f"got {self.c_tilde_from!r}")


class ReplayBuffer(NamedTuple):
  """Fixed-size ring buffer of the policy's decisions; slot = step % buffer_size."""

  features: jax.Array  # [N, F] float32, the normalised state s_b the policy saw
  log_gamma: jax.Array  # [N] float32, the sampled (unclipped) log gamma
  active: jax.Array  # [N, G] bool, the sampled subset S_b
  log_prob: jax.Array  # [N] float32, log pi_old(a_b | s_b) at sampling time
  reward: jax.Array  # [N] float32, r_t (eq. 68), once known
  advantage: jax.Array  # [N] float32, (r_t - baseline) / std at completion time
  valid: jax.Array  # [N] bool, reward known
  version: jax.Array  # [N] int32, the number of policy updates before it was sampled


class RunningStats(NamedTuple):
  """Exponentially weighted mean/variance with a warm-up (exact mean for early steps)."""

  mean: jax.Array
  var: jax.Array
  count: jax.Array  # int32, observations so far


class PSUMetrics(NamedTuple):
  """The last step's decision and its reward."""

  gamma: jax.Array
  eta_mod: jax.Array
  a_tilde: jax.Array
  active_share: jax.Array
  multiplier: jax.Array  # gamma * eta_mod * active share: the update's effective scale
  value: jax.Array  # V (eq. 65)
  value_bar: jax.Array  # V-bar (eq. 66)
  confidence: jax.Array  # C (eq. 67)
  reward: jax.Array  # r (eq. 68)
  baseline: jax.Array
  advantage: jax.Array
  log_std: jax.Array
  policy_updates: jax.Array  # int32, REINFORCE rounds done


class PSUState(NamedTuple):
  """All of the PSU's state: fixed shapes and dtypes across steps."""

  step: jax.Array  # int32
  key: jax.Array  # uint32[2]
  policy: dict[str, jax.Array]
  policy_opt_state: optax.OptState
  buffer: ReplayBuffer
  window: jax.Array  # [Delta] float32, the last values V (ring)
  window_count: jax.Array  # int32, values written into `window`
  features: RunningStats  # [F] running normalisation of the raw features
  loss_ema: RunningStats  # scalar
  grad_max: jax.Array  # float32, running max of the grad norm (eq. 62)
  rewards: RunningStats  # scalar, baseline = mean (eq. 68 rewards)
  active: jax.Array  # [G] bool, S_t of the last step (read by `train.masked_step`)
  metrics: PSUMetrics


# ----------------------------------------------------------------------------------------
# Small pure pieces (public for tests and for reading).


def eta_mod(a_tilde: jax.Array, c_tilde: jax.Array) -> jax.Array:
  """eta_mod / eta_0 = (2 / pi) * arctan(a~ / c~), eq. 64."""
  return (2.0 / math.pi) * jnp.arctan(a_tilde / c_tilde)


def confidence(entropy: jax.Array, alpha: float | jax.Array) -> jax.Array:
  """C_t = exp(-alpha * H(B_t)) (B.2, after eq. 67)."""
  return jnp.exp(-alpha * entropy)


def reward(value_bar: jax.Array, conf: jax.Array, gamma: jax.Array,
           penalty: float) -> jax.Array:
  """r_t = V-bar_t * C_t - lambda * (gamma_t - 1)^2, eq. 68 with s_t read as gamma_t."""
  return value_bar * conf - penalty * jnp.square(gamma - 1.0)


def _running_update(stats: RunningStats, x: jax.Array, decay: float) -> RunningStats:
  """EW mean/variance (West 1979); decay min(decay, n / (n + 1)) makes early steps exact."""
  n = stats.count.astype(jnp.float32)
  beta = jnp.minimum(decay, n / (n + 1.0))
  delta = x - stats.mean
  mean = stats.mean + (1.0 - beta) * delta
  var = beta * (stats.var + (1.0 - beta) * jnp.square(delta))
  return RunningStats(mean, var, stats.count + 1)


def _running_init(shape=()) -> RunningStats:
  return RunningStats(jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32),
                      jnp.zeros((), jnp.int32))


def raw_features(*, loss, loss_ema, grad_norm, a_tilde, c_tilde, rarity, entropy,
                 fisher) -> jax.Array:
  """The state vector s_b before normalisation, in SPEC 6 order (`FEATURE_NAMES`);
  `fisher` is the [G] mean squared gradient per group (`feedback.group_fisher`)."""
  tiny = jnp.finfo(jnp.float32).tiny
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  return jnp.stack([
      f32(loss),
      f32(loss) - f32(loss_ema),
      jnp.log(f32(grad_norm) + tiny),
      f32(a_tilde),
      f32(c_tilde),
      f32(rarity),
      f32(entropy),
      jnp.mean(jnp.log(f32(fisher) + tiny)),
  ])


def _policy_init(key: jax.Array, config: PSUConfig, num_groups: int) -> dict[str, jax.Array]:
  # A zero output layer makes the initial mean action gamma = 1 with every group's
  # logit at init_active_logit, whatever the features.
  w1 = jax.random.normal(key, (NUM_FEATURES, config.hidden), jnp.float32)
  policy = {
      "w1": w1 / math.sqrt(NUM_FEATURES),
      "b1": jnp.zeros((config.hidden,), jnp.float32),
      "w2": jnp.zeros((config.hidden, 1 + num_groups), jnp.float32),
      "b2": jnp.concatenate([jnp.zeros((1,), jnp.float32),
                             jnp.full((num_groups,), config.init_active_logit, jnp.float32)]),
      "log_std": jnp.asarray(config.init_log_std, jnp.float32),
  }
  if config.baseline == "features":
    # The learned baseline: v(s) = s . v_w + v_b predicts the (normalised) advantage.
    policy["v_w"] = jnp.zeros((NUM_FEATURES,), jnp.float32)
    policy["v_b"] = jnp.zeros((), jnp.float32)
  return policy


def policy_apply(policy: dict[str, jax.Array], features: jax.Array, config: PSUConfig):
  """pi_phi(. | s): features [..., F] -> (mean of log gamma [...], group logits [..., G],
  log std [])."""
  h = jnp.tanh(features @ policy["w1"] + policy["b1"])
  out = h @ policy["w2"] + policy["b2"]
  log_std = jnp.clip(policy["log_std"], config.min_log_std, config.max_log_std)
  # The mean of log gamma is squashed into (log gamma_min, log gamma_max), 0 at out = 0:
  # beyond the clip range the reward would not depend on the mean, and a mean that
  # wandered there could never come back.
  hi = max(math.log(config.gamma_max), 1e-6)
  lo = max(-math.log(config.gamma_min), 1e-6)
  raw = out[..., 0]
  mu = jnp.where(raw >= 0, hi * jnp.tanh(raw / hi), lo * jnp.tanh(raw / lo))
  return mu, out[..., 1:], log_std


def policy_log_prob(policy, features, log_gamma, active, config: PSUConfig) -> jax.Array:
  """log pi_phi(a | s) of a = (log gamma, S): Gaussian density times Bernoullis."""
  mu, logits, log_std = policy_apply(policy, features, config)
  z = (log_gamma - mu) * jnp.exp(-log_std)
  lp_gamma = -0.5 * jnp.square(z) - log_std - 0.5 * math.log(2.0 * math.pi)
  lp_active = jnp.sum(jnp.where(active, jax.nn.log_sigmoid(logits),
                                jax.nn.log_sigmoid(-logits)), axis=-1)
  return lp_gamma + lp_active


def reinforce_loss(policy, buffer: ReplayBuffer, use: jax.Array, config: PSUConfig) -> jax.Array:
  """Minus the REINFORCE objective over the buffer entries selected by `use` [N] bool.

  -mean[min(rho A, clip(rho, 1 - eps, 1 + eps) A)], rho = pi_phi(a | s) / pi_old(a | s),
  eps = `ratio_clip`. On entries the current policy sampled, rho = 1 and the gradient is
  REINFORCE's, -mean[A grad log pi_phi(a | s)]; the clip (PPO's) keeps the further steps
  on the same entries from over-fitting them: without it, a state whose advantages are
  all negative (the baseline does not depend on the state) drives its mean action away
  from every sampled action. A is the stored moving-average advantage; with
  `baseline='features'` minus v(s), and the squared error of v(s) is added to the loss.
  """
  logp = policy_log_prob(policy, buffer.features, buffer.log_gamma, buffer.active, config)
  rho = jnp.exp(logp - buffer.log_prob)
  adv = buffer.advantage
  w = use.astype(jnp.float32)
  mean = lambda x: jnp.sum(w * x) / jnp.maximum(jnp.sum(w), 1.0)
  value_loss = 0.0
  if config.baseline == "features":
    v = buffer.features @ policy["v_w"] + policy["v_b"]
    value_loss = mean(jnp.square(adv - v))
    adv = adv - jax.lax.stop_gradient(v)
  eps = config.ratio_clip
  obj = jnp.minimum(rho * adv, jnp.clip(rho, 1.0 - eps, 1.0 + eps) * adv)
  return -mean(obj) + value_loss


def _policy_optimizer(config: PSUConfig) -> optax.GradientTransformation:
  return optax.adam(config.policy_lr)


# ----------------------------------------------------------------------------------------
# The transformation.


def group_scale(per_group: jax.Array, groups: PyTree) -> PyTree:
  """Per-group values [G] -> a tree with the params' structure of arrays broadcastable
  to each parameter (a scalar, or [L, 1, ...] for scanned layers)."""
  return jax.tree.map(lambda g: per_group[np.asarray(g)], groups)


def psu(config: PSUConfig, *, alpha: float, c_tilde: float = 1.0,
        seed: int = 0) -> optax.GradientTransformationExtraArgs:
  """The PSU transformation (SPEC 6, Alg. 1, eq. 64-69).

  Args:
    config: `PSUConfig`.
    alpha: the feedback strength; sets the confidence factor C_t = exp(-alpha H(B_t)).
    c_tilde: the learning complexity c~ of eq. 63 (`feedback.learning_complexity`; see
      `PSUConfig.c_tilde_from`).
    seed: seeds the policy's initialisation and the action sampling.

  Returns:
    A transformation whose `init(params)` takes the parameters (arrays or
    `jax.ShapeDtypeStruct`s; one group per top-level layer, `feedback.param_groups`) and
    whose `update(updates, state, params, *, value, grad, value_fn, entropy, rarity=0.,
    touched=None)` takes, like optax's `scale_by_backtracking_linesearch`:

      value:    L(theta_t; B_t), the loss the gradients are of;
      grad:     its gradients (the grad norm, a~ and the Fisher feature come from them);
      value_fn: params -> L(params; B_t), the same batch with the same DMU masks and
                DTU key sets; 'exact' mode evaluates it at theta_t + u' for V (eq. 65);
      entropy:  H(B_t) (eq. 67); rarity: the batch's token rarity (a state feature);
      touched:  optional tree of bools broadcastable to the params, the step's DMU
                sub-network: u' is zero outside it (with S_t, the active subspace of eq. 69).
  """
  if not config.enabled:
    return optax.GradientTransformationExtraArgs(
        lambda params: optax.EmptyState(),
        lambda updates, state, params=None, **extra: (updates, state))

  policy_tx = _policy_optimizer(config)
  n_buf, delta = config.buffer_size, config.delta

  def init_fn(params) -> PSUState:
    _, num_groups, _ = param_groups(params)
    key, init_key = jax.random.split(jax.random.PRNGKey(seed))
    policy = _policy_init(init_key, config, num_groups)
    zero = jnp.zeros((), jnp.float32)
    return PSUState(
        step=jnp.zeros((), jnp.int32),
        key=key,
        policy=policy,
        policy_opt_state=policy_tx.init(policy),
        buffer=ReplayBuffer(
            features=jnp.zeros((n_buf, NUM_FEATURES), jnp.float32),
            log_gamma=jnp.zeros((n_buf,), jnp.float32),
            active=jnp.zeros((n_buf, num_groups), bool),
            log_prob=jnp.zeros((n_buf,), jnp.float32),
            reward=jnp.zeros((n_buf,), jnp.float32),
            advantage=jnp.zeros((n_buf,), jnp.float32),
            valid=jnp.zeros((n_buf,), bool),
            version=jnp.zeros((n_buf,), jnp.int32)),
        window=jnp.zeros((delta,), jnp.float32),
        window_count=jnp.zeros((), jnp.int32),
        features=_running_init((NUM_FEATURES,)),
        loss_ema=_running_init(),
        grad_max=zero,
        rewards=_running_init(),
        active=jnp.ones((num_groups,), bool),
        metrics=PSUMetrics(
            gamma=zero, eta_mod=zero, a_tilde=zero, active_share=zero, multiplier=zero,
            value=zero, value_bar=zero, confidence=zero, reward=zero, baseline=zero,
            advantage=zero, log_std=jnp.asarray(config.init_log_std, jnp.float32),
            policy_updates=jnp.zeros((), jnp.int32)))

  def policy_update(state: PSUState) -> PSUState:
    use = usable(state)

    def one_step(_, carry):
      policy, opt_state = carry
      grads = jax.grad(reinforce_loss)(policy, state.buffer, use, config)
      upd, opt_state = policy_tx.update(grads, opt_state, policy)
      return optax.apply_updates(policy, upd), opt_state

    policy, opt_state = jax.lax.fori_loop(
        0, config.policy_steps, one_step, (state.policy, state.policy_opt_state))
    metrics = state.metrics._replace(policy_updates=state.metrics.policy_updates + 1)
    return state._replace(policy=policy, policy_opt_state=opt_state, metrics=metrics)

  def usable(state: PSUState) -> jax.Array:
    """Entries with a known reward, sampled at most `max_policy_age` updates ago."""
    age = state.metrics.policy_updates - state.buffer.version
    return state.buffer.valid & (age <= config.max_policy_age)

  def update_fn(updates, state: PSUState, params=None, *, value=None, grad=None,
                value_fn=None, entropy=None, rarity=0.0, touched=None, **extra_args):
    del extra_args
    missing = [n for n, v in (("value", value), ("grad", grad), ("entropy", entropy)) if v is None]
    if config.value == "exact":
      missing += [n for n, v in (("value_fn", value_fn), ("params", params)) if v is None]
    if missing:
      raise ValueError(f"psu.update needs the extra args {', '.join(missing)} "
                       f"(value mode {config.value!r})")
    groups, num_groups, _ = param_groups(updates)
    chex.assert_shape(state.active, (num_groups,))
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    loss = f32(value)

    # Features (SPEC 6) and their running normalisation; a~ of eq. 62.
    grad_norm = optax.tree.norm(grad)
    grad_max = jnp.maximum(config.grad_max_decay * state.grad_max, grad_norm)
    a_tilde = grad_norm / jnp.maximum(grad_max, jnp.finfo(jnp.float32).tiny)
    prev_loss_ema = jnp.where(state.loss_ema.count > 0, state.loss_ema.mean, loss)
    fisher = group_fisher(grad, groups, num_groups)
    raw = raw_features(loss=loss, loss_ema=prev_loss_ema, grad_norm=grad_norm,
                       a_tilde=a_tilde, c_tilde=c_tilde, rarity=f32(rarity),
                       entropy=f32(entropy), fisher=fisher)
    feat_stats = _running_update(state.features, raw, config.feature_decay)
    feats = jnp.clip((raw - feat_stats.mean) * jax.lax.rsqrt(feat_stats.var + 1e-8),
                     -config.feature_clip, config.feature_clip)
    loss_ema = _running_update(state.loss_ema, loss, config.loss_ema_decay)

    # Action a_b = (gamma_b, S_b) ~ pi_phi(. | s_b).
    key, k_gamma, k_active = jax.random.split(state.key, 3)
    mu, logits, log_std = policy_apply(state.policy, feats, config)
    if config.stochastic:
      log_gamma = mu + jnp.exp(log_std) * jax.random.normal(k_gamma, (), jnp.float32)
      active = jax.random.bernoulli(k_active, jax.nn.sigmoid(logits))
    else:
      log_gamma, active = mu, logits > 0
    log_prob = policy_log_prob(state.policy, feats, log_gamma, active, config)
    gamma = jnp.clip(jnp.exp(log_gamma), config.gamma_min, config.gamma_max)

    # u' = gamma * eta_mod * P_S(u), eq. 64 and 69; P_S also drops what the DMU masked.
    em = eta_mod(a_tilde, jnp.float32(c_tilde))
    scale = group_scale(gamma * em * active.astype(jnp.float32), groups)
    new_updates = jax.tree.map(lambda u, s: u * s.astype(u.dtype), updates, scale)
    if touched is not None:
      new_updates = jax.tree.map(lambda u, m: jnp.where(m, u, jnp.zeros((), u.dtype)),
                                 new_updates, touched)

    # V (eq. 65) within the step, on the same batch: exactly, or to first order.
    if config.value == "exact":
      v = loss - f32(value_fn(optax.apply_updates(params, new_updates)))
    else:
      v = -sum(jnp.vdot(g.astype(jnp.float32), u.astype(jnp.float32))
               for g, u in zip(jax.tree.leaves(grad), jax.tree.leaves(new_updates)))
    window = state.window.at[state.window_count % delta].set(v)
    window_count = state.window_count + 1
    # Unwritten slots hold 0, so the sum over the ring is the sum of the last values.
    value_bar = jnp.sum(window) / jnp.minimum(window_count, delta).astype(jnp.float32)
    conf = confidence(f32(entropy), alpha)
    r = reward(value_bar, conf, gamma, config.penalty)
    prior = state.rewards
    if config.normalize_advantage:
      # Needs a spread: at least two earlier rewards that differ.
      ok = (prior.count >= 2) & (prior.var > 0)
      adv = (r - prior.mean) * jax.lax.rsqrt(jnp.where(ok, prior.var, 1.0))
      adv = jnp.clip(adv, -config.advantage_clip, config.advantage_clip)
    else:
      ok = prior.count >= 1
      adv = r - prior.mean
    adv = jnp.where(ok, adv, 0.0)
    rewards = _running_update(prior, r, config.baseline_decay)

    slot = state.step % n_buf
    buf = state.buffer
    buf = ReplayBuffer(
        features=buf.features.at[slot].set(feats),
        log_gamma=buf.log_gamma.at[slot].set(log_gamma),
        active=buf.active.at[slot].set(active),
        log_prob=buf.log_prob.at[slot].set(log_prob),
        reward=buf.reward.at[slot].set(r),
        advantage=buf.advantage.at[slot].set(adv),
        valid=buf.valid.at[slot].set(True),
        version=buf.version.at[slot].set(state.metrics.policy_updates))
    active_share = jnp.mean(active.astype(jnp.float32))
    metrics = state.metrics._replace(
        gamma=gamma, eta_mod=em, a_tilde=a_tilde, active_share=active_share,
        multiplier=gamma * em * active_share, value=v, value_bar=value_bar, confidence=conf,
        reward=r, baseline=rewards.mean, advantage=adv, log_std=log_std)
    state = state._replace(
        step=state.step + 1, key=key, buffer=buf, window=window, window_count=window_count,
        features=feat_stats, loss_ema=loss_ema, grad_max=grad_max, rewards=rewards,
        active=active, metrics=metrics)

    if config.learn:
      do_update = (state.step % config.update_every == 0) & jnp.any(usable(state))
      state = jax.lax.cond(do_update, policy_update, lambda s: s, state)
    return new_updates, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def find_psu_state(opt_state: PyTree) -> PSUState | None:
  """The `PSUState` inside an optimizer state (e.g. an `optax.chain` tuple), or None."""
  if isinstance(opt_state, PSUState):
    return opt_state
  if isinstance(opt_state, (tuple, list)):
    for s in opt_state:
      found = find_psu_state(s)
      if found is not None:
        return found
  return None


def psu_metrics(opt_state: PyTree) -> dict[str, jax.Array]:
  """Scalars to log: the last step's gamma, eta_mod, a~, active share, log std, and the
  last completed (previous step's) value, V-bar, confidence, reward, baseline and
  advantage. `opt_state` is a `PSUState` or a state containing one; {} if none (PSU off).
  """
  state = find_psu_state(opt_state)
  if state is None:
    return {}
  return dict(state.metrics._asdict())


__all__ = [
    "FEATURE_NAMES", "PSUConfig", "PSUMetrics", "PSUState", "ReplayBuffer", "confidence",
    "eta_mod", "find_psu_state", "group_scale", "policy_apply", "policy_log_prob", "psu", "psu_metrics",
    "raw_features", "reinforce_loss", "reward",
]
