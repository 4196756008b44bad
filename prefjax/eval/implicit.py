"""Implicit reward models of preference-optimised policies, from sequence log-probs.

A policy trained by a direct alignment method defines a reward through its own
log-probabilities; ranking the two responses of a pair by it turns the policy into a
reward model whose accuracy can be compared with an explicit Bradley–Terry RM
(Lin et al. 2024, "On the Limited Generalization Capability of the Implicit Reward Model
Induced by Direct Preference Optimization", EMNLP Findings).

Definitions (per response y to prompt x; log π(y|x) = Σ_t log π(y_t | x, y_<t) summed
over response tokens, |y| = number of response tokens):

  DPO family   r(x, y) = β · (log π_θ(y|x) − log π_ref(y|x))
               DPO (Rafailov et al. 2023, eq. 5), IPO (Azar et al. 2023), cDPO/robust DPO
               (Mitchell 2023; Chowdhury et al. 2024), R-DPO (Park et al. 2024),
               KTO (Ethayarajh et al. 2024), BCO (Jung et al. 2024), ...
  SimPO        r(x, y) = β / |y| · log π_θ(y|x)   (Meng et al. 2024, eq. 4; reference-free)
  CPO          r(x, y) = β · log π_θ(y|x)          (Xu et al. 2024; TRL CPOTrainer rewards)
  ORPO         r(x, y) = log odds_θ(y|x) = log P − log(1 − P),  P = exp(log π_θ(y|x) / |y|)
               (Hong et al. 2024, eq. 3–4; the odds-ratio term is r(y_w) − r(y_l))
  RRHF         r(x, y) = log π_θ(y|x) / |y|       (Yuan et al. 2023, length-normalised)

For ranking, any positive β gives the same accuracy; it matters for the reward
mean/std/margin that a report shows, so pass the β the policy was trained with.

All functions are pure jnp (jit-able, also accept numpy arrays) and upcast to float32.
Shape letters: B pairs or responses.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax.numpy as jnp

Array = Any  # jax.Array or np.ndarray


def _f32(x: Array) -> jnp.ndarray:
  return jnp.asarray(x, jnp.float32)


def dpo_reward(logps: Array, ref_logps: Array, *, beta: float) -> jnp.ndarray:
  """β · (log π_θ(y|x) − log π_ref(y|x)) (Rafailov et al. 2023, eq. 5).

  Args:
    logps: [B] summed policy log-probs; ref_logps: [B] summed reference log-probs.
    beta: KL coefficient the policy was trained with.

  Returns:
    [B] float32.
  """
  return beta * (_f32(logps) - _f32(ref_logps))


def simpo_reward(logps: Array, lengths: Array, *, beta: float) -> jnp.ndarray:
  """β / |y| · log π_θ(y|x) (Meng et al. 2024, eq. 4): reference-free, length-normalised.

  Args:
    logps: [B] summed policy log-probs; lengths: [B] response token counts (> 0).
    beta: SimPO's reward scale.

  Returns:
    [B] float32.
  """
  return beta * _f32(logps) / jnp.maximum(_f32(lengths), 1.0)


def cpo_reward(logps: Array, *, beta: float) -> jnp.ndarray:
  """β · log π_θ(y|x) (Xu et al. 2024; the rewards TRL's CPOTrainer logs). [B] float32."""
  return beta * _f32(logps)


def orpo_log_odds(logps: Array, lengths: Array) -> jnp.ndarray:
  """log odds_θ(y|x) = log P − log(1 − P), P = exp(log π_θ(y|x) / |y|) (Hong et al. 2024).

  Computed stably as a − log(−expm1(a)) with a = mean token log-prob, clamped at
  −1e-6 (probability one has infinite odds), as in `prefjax.losses.orpo`. Note that
  `prefjax.losses.orpo` *logs* TRL's rewards λ·a instead; both are increasing in a,
  so the pairwise accuracy is the same, only the scale differs.

  Args:
    logps: [B] summed policy log-probs; lengths: [B] response token counts (> 0).

  Returns:
    [B] float32; the ORPO log odds ratio of a pair is the chosen minus the rejected value.
  """
  avg = jnp.minimum(_f32(logps) / jnp.maximum(_f32(lengths), 1.0), -1e-6)
  return avg - jnp.log(-jnp.expm1(avg))


def rrhf_reward(logps: Array, lengths: Array) -> jnp.ndarray:
  """log π_θ(y|x) / |y| (Yuan et al. 2023, RRHF's length-normalised score). [B] float32."""
  return _f32(logps) / jnp.maximum(_f32(lengths), 1.0)


# Which per-response definition each method uses: "ref" (β·log-ratio), "simpo",
# "cpo", "orpo" (log odds), "rrhf". Keys are `prefjax.losses.names()` (TRL loss_types),
# plus the unpaired "kto"/"bco"/"apo_zero_unpaired" and token-level "tdpo*"/"ld_dpo",
# whose reward is also β·log-ratio.
METHOD_KIND = {
    **{name: "ref" for name in (
        "dpo", "sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "nca_pair", "robust",
        "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop",
        "rdpo", "dpop", "kto", "bco", "apo_zero_unpaired", "tdpo", "tdpo1", "tdpo2",
        "ld_dpo")},
    "simpo": "simpo", "cpo": "cpo", "slic": "cpo", "orpo": "orpo", "rrhf": "rrhf",
}


def implicit_reward(method: str, logps: Array, *, ref_logps: Optional[Array] = None,
                    lengths: Optional[Array] = None, beta: float = 0.1) -> jnp.ndarray:
  """The implicit reward of each response under `method`'s definition (module docstring).

  Args:
    method: a key of `METHOD_KIND` (e.g. "dpo", "ipo", "simpo", "orpo").
    logps: [B] summed policy log-probs.
    ref_logps: [B] summed reference log-probs (DPO family only).
    lengths: [B] response token counts (SimPO, ORPO, RRHF).
    beta: the method's reward scale (unused by ORPO and RRHF).

  Returns:
    [B] float32.
  """
  kind = METHOD_KIND.get(method)
  if kind is None:
    raise ValueError(f"no implicit reward defined for {method!r}; known: {sorted(METHOD_KIND)}")
  needs = {"ref": ("ref_logps",), "simpo": ("lengths",), "orpo": ("lengths",),
           "rrhf": ("lengths",), "cpo": ()}[kind]
  given = {"ref_logps": ref_logps, "lengths": lengths}
  missing = [n for n in needs if given[n] is None]
  if missing:
    raise ValueError(f"implicit reward of {method!r} needs {missing}")
  if kind == "ref":
    return dpo_reward(logps, ref_logps, beta=beta)
  if kind == "simpo":
    return simpo_reward(logps, lengths, beta=beta)
  if kind == "cpo":
    return cpo_reward(logps, beta=beta)
  if kind == "orpo":
    return orpo_log_odds(logps, lengths)
  return rrhf_reward(logps, lengths)


def implicit_pair_rewards(method: str, logps: Any, *,
                          beta: float = 0.1) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(chosen [B], rejected [B]) implicit rewards of a batch of pairs.

  Args:
    method: see `implicit_reward`.
    logps: a `prefjax.losses.PairedLogps` (or any object with the same attributes:
      chosen, rejected, ref_chosen, ref_rejected, chosen_lengths, rejected_lengths).
    beta: the method's reward scale.
  """
  chosen = implicit_reward(method, logps.chosen, ref_logps=logps.ref_chosen,
                           lengths=logps.chosen_lengths, beta=beta)
  rejected = implicit_reward(method, logps.rejected, ref_logps=logps.ref_rejected,
                             lengths=logps.rejected_lengths, beta=beta)
  return chosen, rejected


def rewards_from_loss(name: str, logps: Any, **hparams: Any) -> tuple[Array, Array]:
  """(chosen, rejected) rewards exactly as `prefjax.losses.get(name)` reports them.

  Use this to evaluate with the loss module's own `chosen_rewards` definition (e.g.
  for a method not in `METHOD_KIND`); the loss value itself is discarded.

  Args:
    name: a registered loss name (`prefjax.losses.names()`).
    logps: `prefjax.losses.PairedLogps`.
    **hparams: the loss's keyword hyperparameters (beta, ...).
  """
  from prefjax import losses  # pylint: disable=import-outside-toplevel
  out = losses.get(name)(logps, **hparams)
  return out.chosen_rewards, out.rejected_rewards


def score_fn_from_logps(logps_fn: Callable[[dict], Any], method: str, *,
                        beta: float) -> Callable[[dict], tuple[Array, Array]]:
  """Turns `logps_fn(batch) -> PairedLogps` into a `score_pairs_fn` for the runner.

  Args:
    logps_fn: computes per-sequence policy (and reference) log-probs of a batch, e.g.
      the trainer's jitted eval forward.
    method: implicit-reward definition (`implicit_reward`).
    beta: the method's reward scale.

  Returns:
    `score_pairs_fn(batch) -> (chosen_rewards, rejected_rewards)`.
  """
  def score_pairs_fn(batch: dict) -> tuple[Array, Array]:
    return implicit_pair_rewards(method, logps_fn(batch), beta=beta)
  return score_pairs_fn
