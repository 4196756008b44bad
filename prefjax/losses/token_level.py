"""Token-level paired losses over per-token log-probs: TDPO and LD-DPO.

Inputs are `TokenLogps` with [B, L] per-token log-probs and masks (1 on
response tokens). Masked positions are ignored whatever their value. Missing
masks mean "every position is a response token".
"""
import jax
import jax.numpy as jnp

from prefjax.losses import paired
from prefjax.losses.types import Array, LossOutput, PairedLogps, TokenLogps, require, to_f32


def _masks(tl: TokenLogps) -> tuple[Array, Array]:
  cm = jnp.ones_like(tl.chosen) if tl.chosen_mask is None else tl.chosen_mask
  rm = jnp.ones_like(tl.rejected) if tl.rejected_mask is None else tl.rejected_mask
  return jnp.asarray(cm, jnp.float32), jnp.asarray(rm, jnp.float32)


def _msum(x: Array | None, mask: Array) -> Array | None:
  return None if x is None else jnp.sum(jnp.where(mask > 0, x, 0.0), axis=-1)


def to_paired(token_logps: TokenLogps) -> PairedLogps:
  """Masked sums over tokens: [B, L] `TokenLogps` -> [B] `PairedLogps` with lengths."""
  tl = to_f32(token_logps)
  cm, rm = _masks(tl)
  return PairedLogps(
      chosen=_msum(tl.chosen, cm), rejected=_msum(tl.rejected, rm),
      ref_chosen=_msum(tl.ref_chosen, cm), ref_rejected=_msum(tl.ref_rejected, rm),
      chosen_lengths=jnp.sum(cm, -1), rejected_lengths=jnp.sum(rm, -1))


def ld_paired(token_logps: TokenLogps, *, ld_alpha: float) -> PairedLogps:
  """LD-DPO sequence log-probs (Liu et al. 2024, "Length Desensitization in DPO").

  With l_s = min(|y_w|, |y_l|), a response's log-prob is split into the first
  l_s response tokens (shared part) and the rest (the verbose tail), and
    log π̃(y) = Σ_{t ≤ l_s} log π(y_t) + α · Σ_{t > l_s} log π(y_t),
  for policy and reference alike (α = `ld_alpha` ∈ [0, 1]; 1 is plain DPO,
  0 drops the tail). This is TRL's `ld_alpha` computation; feed the result to
  any paired loss. Lengths in the output are the true response lengths.
  """
  tl = to_f32(token_logps)
  cm, rm = _masks(tl)
  lc, lr = jnp.sum(cm, -1), jnp.sum(rm, -1)
  shared = jnp.minimum(lc, lr)[:, None]

  def weights(mask: Array) -> Array:
    pos = jnp.cumsum(mask, axis=-1)  # 1-based index among response tokens
    return mask * jnp.where(pos <= shared, 1.0, ld_alpha)

  wc, wr = weights(cm), weights(rm)
  s = lambda x, w: None if x is None else jnp.sum(jnp.where(w > 0, x * w, 0.0), -1)
  return PairedLogps(chosen=s(tl.chosen, wc), rejected=s(tl.rejected, wr),
                     ref_chosen=s(tl.ref_chosen, wc), ref_rejected=s(tl.ref_rejected, wr),
                     chosen_lengths=lc, rejected_lengths=lr)


def ld_dpo(token_logps: TokenLogps, *, beta: float = 0.1, ld_alpha: float = 0.5,
           label_smoothing: float = 0.0) -> LossOutput:
  """LD-DPO (Liu et al. 2024): DPO (Rafailov et al. 2023, Eq. 7) on `ld_paired` log-probs.

  TRL enables this with `ld_alpha` (default None = off); here the loss has its
  own name and default α = 0.5 (the paper tunes α per model, about 0.3–0.8).
  Needs `ref_chosen`, `ref_rejected`. Rewards are β·(log π̃ − log π̃_ref).
  """
  require(token_logps, ("ref_chosen", "ref_rejected"), "ld_dpo")
  return paired.sigmoid(ld_paired(token_logps, ld_alpha=ld_alpha), beta=beta,
                        label_smoothing=label_smoothing)


def _tdpo(tl: TokenLogps, name: str, beta: float, alpha: float | None) -> LossOutput:
  require(tl, ("ref_chosen", "ref_rejected", "chosen_kl", "rejected_kl"), name)
  tl = to_f32(tl)
  cm, rm = _masks(tl)
  margin_w = _msum(tl.chosen - tl.ref_chosen, cm)
  margin_l = _msum(tl.rejected - tl.ref_rejected, rm)
  kl_w, kl_l = _msum(tl.chosen_kl, cm), _msum(tl.rejected_kl, rm)
  if alpha is None:  # TDPO1
    z = (margin_w - margin_l) - (kl_l - kl_w)
  else:  # TDPO2: stop-gradient on the chosen sequential KL, weight α.
    z = (margin_w - margin_l) - alpha * (kl_l - jax.lax.stop_gradient(kl_w))
  sg = jax.lax.stop_gradient
  return LossOutput(-jax.nn.log_sigmoid(beta * z), sg(beta * (margin_w + kl_w)),
                    sg(beta * (margin_l + kl_l)), aux={"seq_kl_chosen": sg(kl_w),
                                                       "seq_kl_rejected": sg(kl_l)})


def tdpo1(token_logps: TokenLogps, *, beta: float = 0.1) -> LossOutput:
  """TDPO1 (Zeng et al. 2024, "Token-level Direct Preference Optimization", TDPO1 objective).

  With u = β Σ_t log(π_θ/π_ref)(y_w,t) − β Σ_t log(π_θ/π_ref)(y_l,t) and the
  sequential KLs D(y) = Σ_t KL(π_ref(·|x, y_<t) || π_θ(·|x, y_<t)):
    loss = −log σ(u − β(D(y_l) − D(y_w))).
  Needs `ref_chosen`, `ref_rejected` and the per-token KLs `chosen_kl`,
  `rejected_kl` [B, L]. Rewards β·(Σ log-ratio + D(y)), as the authors' code.
  """
  return _tdpo(token_logps, "tdpo1", beta, None)


def tdpo2(token_logps: TokenLogps, *, beta: float = 0.1, tdpo_alpha: float = 0.5) -> LossOutput:
  """TDPO2 (Zeng et al. 2024, TDPO2 objective): TDPO1 with the KL gap weighted and half-stopped.

    loss = −log σ(u − α·β(D(y_l) − sg(D(y_w)))),  α = `tdpo_alpha` (default 0.5
  as the authors' code). See `tdpo1` for u and D.
  """
  return _tdpo(token_logps, "tdpo2", beta, tdpo_alpha)


def wpo_weights(token_logps: TokenLogps, chosen_log_sum_sq_probs: Array,
                rejected_log_sum_sq_probs: Array) -> Array:
  """WPO pair weights (Zhou et al. 2024, "Weighted Preference Optimization", Eq. 2), as TRL's `use_weighting`.

  Each response is weighted by its length-normalised probability under the
  current policy, aligned by the policy's own "sharpness":
    w(y) = exp( (1/|y|) Σ_t [log π(y_t) − log Σ_v π(v)²] ),
  and a pair by w(y_w)·w(y_l), under stop_gradient. Multiply any paired loss by
  it: `out.loss * wpo_weights(...)` (not meaningful for `aot`, which sorts).

  Args:
    token_logps: `TokenLogps`; uses `chosen`, `rejected` and the masks.
    chosen_log_sum_sq_probs: [B, L] log Σ_v π(v | x, y_<t)² along the chosen response.
    rejected_log_sum_sq_probs: [B, L] the same along the rejected response.

  Returns:
    [B] weights.
  """
  tl = to_f32(token_logps)
  cm, rm = _masks(tl)

  def w(lp: Array, lss: Array, mask: Array) -> Array:
    aligned = _msum(lp - jnp.asarray(lss, jnp.float32), mask)
    return jnp.exp(aligned / jnp.maximum(jnp.sum(mask, -1), 1.0))

  return jax.lax.stop_gradient(w(tl.chosen, chosen_log_sum_sq_probs, cm)
                               * w(tl.rejected, rejected_log_sum_sq_probs, rm))
