"""Reference-free paired losses: SimPO, CPO, ORPO, RRHF, SLiC-HF.

These need no reference model: `ref_chosen` / `ref_rejected` may be None. The
length-normalised ones need `chosen_lengths` / `rejected_lengths` (response
token counts; clamped at 1 so an empty response gives no NaN).

NLL terms come in three normalisations (`nll_normalization`):
  "batch":   loss_i = −log π(y_w,i) · B / Σ_j |y_w,j|, so mean(loss) is the token
             mean over the whole batch: what TRL's CPO/ORPO `nn.CrossEntropyLoss`
             computes. A BATCH-LEVEL normalisation.
  "example": loss_i = −log π(y_w,i) / |y_w,i| (per-example token mean).
  "sum":     loss_i = −log π(y_w,i) (the sequence NLL as the papers write it).
"""
import jax
import jax.numpy as jnp

from prefjax.losses.types import Array, LossOutput, PairedLogps, is_concrete, require, to_f32

_LENS = ("chosen_lengths", "rejected_lengths")
NLL_NORMALIZATIONS = ("batch", "example", "sum")


def _sg(x: Array) -> Array:
  return jax.lax.stop_gradient(x)


def _avg(lp: PairedLogps) -> tuple[Array, Array]:
  """Per-token mean log-probs [B] of chosen and rejected (lengths clamped at 1)."""
  return (lp.chosen / jnp.maximum(lp.chosen_lengths, 1.0),
          lp.rejected / jnp.maximum(lp.rejected_lengths, 1.0))


def chosen_nll(lp: PairedLogps, nll_normalization: str, name: str) -> Array:
  """[B] NLL of the chosen responses, normalised as the module docstring says."""
  if nll_normalization == "sum":
    return -lp.chosen
  require(lp, ("chosen_lengths",), name)
  if nll_normalization == "example":
    return -lp.chosen / jnp.maximum(lp.chosen_lengths, 1.0)
  if nll_normalization == "batch":
    tokens = jnp.maximum(jnp.sum(lp.chosen_lengths), 1.0)
    return -lp.chosen * lp.chosen.shape[0] / tokens
  raise ValueError(f"Unknown nll_normalization {nll_normalization!r}; "
                   f"expected one of {list(NLL_NORMALIZATIONS)}.")


def _smoothed_sigmoid(z: Array, label_smoothing: float) -> Array:
  return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)


def simpo(logps: PairedLogps, *, beta: float = 0.1, simpo_gamma: float = 0.5,
          gamma: float | None = None, label_smoothing: float = 0.0) -> LossOutput:
  """SimPO (Meng et al. 2024, "Simple Preference Optimization...", Eq. 6).

  Reward = β · average token log-prob; target margin γ:
    loss = −(1 − ε) log σ(z) − ε log σ(−z),
    z = β·log π(y_w)/|y_w| − β·log π(y_l)/|y_l| − γ.
  ε = 0 is the paper; ε > 0 is TRL's (CPOTrainer, loss_type="simpo") smoothing.
  `gamma` is an alias of TRL's `simpo_gamma` (TRL default 0.5; the paper tunes
  β ≈ 2–10 with γ/β ≈ 0.3–1.6). TRL's CPOTrainer adds `cpo_alpha`·NLL on top;
  that is `cpo(..., loss_type="simpo")` here. Needs lengths.

  Returns:
    `LossOutput`; rewards β·log π(y)/|y| [B].
  """
  require(logps, _LENS, "simpo")
  lp = to_f32(logps)
  g = simpo_gamma if gamma is None else gamma
  aw, al = _avg(lp)
  z = beta * (aw - al) - g
  return LossOutput(_smoothed_sigmoid(z, label_smoothing), _sg(beta * aw), _sg(beta * al))


def cpo(logps: PairedLogps, *, beta: float = 0.1, cpo_alpha: float = 1.0,
        label_smoothing: float = 0.0, loss_type: str = "sigmoid",
        simpo_gamma: float = 0.5, alpha: float = 0.0,
        nll_normalization: str = "batch") -> LossOutput:
  """CPO (Xu et al. 2024, "Contrastive Preference Optimization", Eq. 3 + NLL), as TRL's CPOTrainer.

  With s_y = log π_θ(y|x) (per-token average for loss_type "ipo"/"simpo", as
  TRL), optionally AlphaPO-shaped s_y = (1 − exp(−α·s_y))/α when α ≠ 0
  (Gupta et al. 2025), and h = s_w − s_l:
    sigmoid: −(1 − ε) log σ(βh) − ε log σ(−βh)       (Eq. 3 at ε = 0)
    hinge:   max(0, 1 − βh)
    ipo:     (h − 1/(2β))²
    simpo:   sigmoid form on h − γ/β, γ = `simpo_gamma` (CPO-SimPO)
  plus `cpo_alpha` · NLL(y_w). TRL's NLL is the token mean over the batch
  ("batch", the default, for parity); the paper's is the sequence NLL ("sum").
  Lengths are needed for "ipo"/"simpo" and for token-normalised NLL.

  Returns:
    `LossOutput`; rewards β·s_y [B]; aux["nll"] [B] (unweighted).
  """
  if loss_type not in ("sigmoid", "hinge", "ipo", "simpo"):
    raise ValueError(f"cpo loss_type must be sigmoid/hinge/ipo/simpo, got {loss_type!r}.")
  lp = to_f32(logps)
  if loss_type in ("ipo", "simpo"):
    require(lp, _LENS, f"cpo[{loss_type}]")
    sw, sl = _avg(lp)
  else:
    sw, sl = lp.chosen, lp.rejected
  if not is_concrete(alpha) or alpha != 0.0:  # a traced α must be non-zero
    sw, sl = (1.0 - jnp.exp(-alpha * sw)) / alpha, (1.0 - jnp.exp(-alpha * sl)) / alpha
  h = sw - sl
  if loss_type == "sigmoid":
    pref = _smoothed_sigmoid(beta * h, label_smoothing)
  elif loss_type == "simpo":
    pref = _smoothed_sigmoid(beta * (h - simpo_gamma / beta), label_smoothing)
  elif loss_type == "hinge":
    pref = jax.nn.relu(1.0 - beta * h)
  else:
    pref = (h - 1.0 / (2.0 * beta)) ** 2
  if not is_concrete(cpo_alpha) or cpo_alpha != 0.0:
    nll = chosen_nll(lp, nll_normalization, "cpo")
  else:
    nll = jnp.zeros_like(pref)
  return LossOutput(pref + cpo_alpha * nll, _sg(beta * sw), _sg(beta * sl),
                    aux={"nll": _sg(nll), "preference": _sg(pref)})


def _log1mexp(x: Array) -> Array:
  """log(1 − exp(x)) for x < 0, stable (Mächler 2012); x is clamped at −1e-6."""
  x = jnp.minimum(x, -1e-6)
  return jnp.where(x < -0.6931471805599453, jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))


def orpo(logps: PairedLogps, *, beta: float = 0.1, lam: float | None = None,
         nll_normalization: str = "example") -> LossOutput:
  """ORPO (Hong et al. 2024, "Monolithic Preference Optimization...", Eqs. 4, 6, 7).

  On per-token average log-probs p̄_y = log π(y|x)/|y|:
    log odds(y) = p̄_y − log(1 − exp(p̄_y))                  (Eq. 4)
    loss = NLL(y_w) − λ · log σ(log odds(y_w) − log odds(y_l))  (Eqs. 6, 7)
  λ = `lam`, or TRL's name for it, `beta` (default 0.1) when `lam` is None.
  The NLL defaults to the per-example token mean ("example"). TRL's ORPOTrainer
  instead takes the token mean over the whole batch ("batch") and over prompt
  AND response tokens; with responses-only log-probs only the former can be
  matched. Average log-probs ≥ −1e-6 are clamped (p = 1 has infinite odds).
  Needs lengths.

  Returns:
    `LossOutput`; rewards λ·p̄_y [B] (TRL's); aux "nll", "log_odds" [B].
  """
  require(logps, _LENS, "orpo")
  lp = to_f32(logps)
  lam = beta if lam is None else lam
  aw, al = _avg(lp)
  log_odds = (aw - al) - (_log1mexp(aw) - _log1mexp(al))
  nll = chosen_nll(lp, nll_normalization, "orpo")
  loss = nll - lam * jax.nn.log_sigmoid(log_odds)
  return LossOutput(loss, _sg(lam * aw), _sg(lam * al),
                    aux={"nll": _sg(nll), "log_odds": _sg(log_odds)})


def rrhf(logps: PairedLogps, *, beta: float = 1.0, nll_weight: float = 1.0,
         nll_normalization: str = "example") -> LossOutput:
  """RRHF for a pair (Yuan et al. 2023, "Rank Responses to align Human Feedback", L = L_rank + L_ft).

  Scores are length-normalised log-probs p_y = log π(y|x)/|y|:
    L_rank = Σ_{r_i < r_j} max(0, p_i − p_j) = max(0, p_l − p_w) for a pair,
    L_ft   = NLL of the best response y_w,
    loss   = β·L_rank + nll_weight·L_ft   (β = 1 is the paper).
  The official code takes the token mean for L_ft ("example", default); the
  paper writes the token sum ("sum"). Needs lengths.

  Returns:
    `LossOutput`; rewards p_y [B].
  """
  require(logps, _LENS, "rrhf")
  lp = to_f32(logps)
  pw, pl = _avg(lp)
  nll = chosen_nll(lp, nll_normalization, "rrhf")
  loss = beta * jax.nn.relu(pl - pw) + nll_weight * nll
  return LossOutput(loss, _sg(pw), _sg(pl), aux={"nll": _sg(nll)})


def slic(logps: PairedLogps, *, beta: float = 1.0, delta: float = 1.0,
         slic_lambda: float = 0.1, nll_normalization: str = "sum") -> LossOutput:
  """SLiC-HF (Zhao et al. 2023, "Calibrating Sequence Likelihood...", rank calibration + CE reg.).

    loss = max(0, δ − β·(log π(y_w|x) − log π(y_l|x))) − λ·log π(y_w|x)
  with y_w as the regularisation target (SLiC-HF's "SFT target" variant);
  β = 1 is the paper. The NLL is the sequence sum by default, as in the paper.

  Returns:
    `LossOutput`; rewards β·log π(y|x) [B].
  """
  lp = to_f32(logps)
  nll = chosen_nll(lp, nll_normalization, "slic")
  loss = jax.nn.relu(delta - beta * (lp.chosen - lp.rejected)) + slic_lambda * nll
  return LossOutput(loss, _sg(beta * lp.chosen), _sg(beta * lp.rejected), aux={"nll": _sg(nll)})
