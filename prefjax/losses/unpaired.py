"""Unpaired (binary-feedback) losses: KTO, APO-zero-unpaired and BCO.

Inputs are `UnpairedLogps` ([B] summed log-probs, [B] labels: True =
desirable). Rewards are r = β·(log π_θ(y|x) − log π_ref(y|x)) [B].
"""
import flax.struct
import jax
import jax.numpy as jnp

from prefjax.losses.types import Array, UnpairedLogps, UnpairedLossOutput, require


def _prepare(u: UnpairedLogps, name: str) -> tuple[UnpairedLogps, Array]:
  require(u, ("ref_logps",), name)
  label = jnp.asarray(u.label).astype(bool)
  f = lambda x: None if x is None else jnp.asarray(x, jnp.float32)
  return UnpairedLogps(f(u.logps), f(u.ref_logps), label, f(u.kl_logps), f(u.kl_ref_logps)), label


def kto_reference_point(u: UnpairedLogps) -> Array:
  """KTO's z0 (Ethayarajh et al. 2024, reference point of the KTO loss): a biased estimate of KL(π_θ || π_ref).

  z0 = max(0, mean_j (log π_θ(y'_j|x_j) − log π_ref(y'_j|x_j))) over mismatched
  pairs (x_j, y'_j), under stop_gradient. Returns a scalar. Under jit with a
  sharded batch the mean is the global mean (TRL gathers across ranks too).
  """
  require(u, ("kl_logps", "kl_ref_logps"), "kto")
  kl = jnp.mean(jnp.asarray(u.kl_logps, jnp.float32) - jnp.asarray(u.kl_ref_logps, jnp.float32))
  return jax.lax.stop_gradient(jnp.maximum(kl, 0.0))


def kto(logps: UnpairedLogps, *, beta: float = 0.1, desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0, kl: Array | None = None) -> UnpairedLossOutput:
  """KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", Eq. 7).

    desirable:   loss = λ_D · (1 − σ(β(Δ − z0)))
    undesirable: loss = λ_U · (1 − σ(β(z0 − Δ)))
  with Δ = log π_θ(y|x) − log π_ref(y|x), λ_D = `desirable_weight`,
  λ_U = `undesirable_weight` and z0 the reference point: `kl` if given (a
  scalar you computed, e.g. from another batch), else `kto_reference_point`
  from `kl_logps` / `kl_ref_logps`. z0 is clamped at 0 and carries no gradient.
  mean(loss) equals TRL's KTOTrainer loss (which concatenates desirable then
  undesirable losses and takes their mean).

  Returns:
    `UnpairedLossOutput`; rewards β·Δ [B]; aux["kl"] = z0.
  """
  lp, label = _prepare(logps, "kto")
  z0 = kto_reference_point(lp) if kl is None else jax.lax.stop_gradient(
      jnp.maximum(jnp.asarray(kl, jnp.float32), 0.0))
  d = lp.logps - lp.ref_logps
  loss = jnp.where(label, desirable_weight * (1.0 - jax.nn.sigmoid(beta * (d - z0))),
                   undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (z0 - d))))
  return UnpairedLossOutput(loss, jax.lax.stop_gradient(beta * d), aux={"kl": z0})


def apo_zero_unpaired(logps: UnpairedLogps, *, beta: float = 0.1, desirable_weight: float = 1.0,
                      undesirable_weight: float = 1.0) -> UnpairedLossOutput:
  """Unpaired APO-zero (D'Oosterlinck et al. 2024, Eq. 7 split by label; TRL KTO loss_type).

    desirable: λ_D·(1 − σ(βΔ));  undesirable: λ_U·σ(βΔ).
  """
  lp, label = _prepare(logps, "apo_zero_unpaired")
  d = lp.logps - lp.ref_logps
  loss = jnp.where(label, desirable_weight * (1.0 - jax.nn.sigmoid(beta * d)),
                   undesirable_weight * jax.nn.sigmoid(beta * d))
  return UnpairedLossOutput(loss, jax.lax.stop_gradient(beta * d))


@flax.struct.dataclass
class BCOState:
  """BCO's running reward mean δ: explicit state, threaded by the caller.

  Attributes:
    mean: scalar, the running mean δ of the batch-mean rewards.
    count: scalar, how many batches it has averaged.
  """
  mean: Array
  count: Array

  @classmethod
  def init(cls) -> "BCOState":
    return cls(mean=jnp.zeros((), jnp.float32), count=jnp.zeros((), jnp.float32))


def bco(logps: UnpairedLogps, state: BCOState, *, beta: float = 0.1
        ) -> tuple[UnpairedLossOutput, BCOState]:
  """Unpaired BCO (Jung et al. 2024, "Binary Classifier Optimization", reward-shifted BCE).

  A binary classifier with logit r − δ, r = β·Δ:
    desirable:   loss = −log σ(r − δ);   undesirable: loss = −log σ(−(r − δ)).
  δ is the running mean of the batch-mean reward (all examples of the batch),
  updated BEFORE use as TRL's BCOTrainer (trl < 1.0, `RunningMoments`) did:
    δ_new = δ + (mean(r) − δ) / (count + 1).
  Returns the new state; nothing is hidden. δ carries no gradient. (BCO's
  optional UDM density-ratio weighting needs an embedding classifier and is
  not included.)

  Returns:
    (`UnpairedLossOutput` with rewards r [B] and aux["delta"], new `BCOState`).
  """
  lp, label = _prepare(logps, "bco")
  r = beta * (lp.logps - lp.ref_logps)
  batch_mean = jax.lax.stop_gradient(jnp.mean(r))
  count = state.count + 1.0
  delta = state.mean + (batch_mean - state.mean) / count
  z = r - delta
  loss = jnp.where(label, -jax.nn.log_sigmoid(z), -jax.nn.log_sigmoid(-z))
  out = UnpairedLossOutput(loss, jax.lax.stop_gradient(r), aux={"delta": delta})
  return out, BCOState(mean=delta, count=count)
