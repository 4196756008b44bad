"""The DPO family: paired losses on policy and reference log-probs.

Every function takes a `PairedLogps` of SUMMED response log-probs [B] and
returns a `LossOutput` with a per-example loss [B] and the implicit rewards
r = β·(log π_θ(y|x) − log π_ref(y|x)) [B] (the rewards TRL's `DPOTrainer` logs,
for every `loss_type`). Names and defaults follow TRL 1.16's `DPOConfig`
(`beta=0.1`, `label_smoothing=0.0`, `discopop_tau=0.05`,
`f_divergence_type="reverse_kl"`, `f_alpha_divergence_coef=0.5`).

Notation: Δ_w = log π_θ(y_w|x) − log π_ref(y_w|x) (chosen log-ratio),
Δ_l likewise for the rejected response, Δ = Δ_w − Δ_l, σ the logistic function.
All maths is float32 whatever the input dtype.
"""
import math

import jax
import jax.numpy as jnp

from prefjax.losses.types import Array, LossOutput, PairedLogps, is_concrete, require, to_f32

_REF = ("ref_chosen", "ref_rejected")
_LENS = ("chosen_lengths", "rejected_lengths")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


def _prepare(logps: PairedLogps, name: str, lengths: bool = False) -> PairedLogps:
  require(logps, _REF + (_LENS if lengths else ()), name)
  return to_f32(logps)


def _rewards(lp: PairedLogps, beta: float) -> tuple[Array, Array]:
  """β·Δ_w, β·Δ_l under stop_gradient (TRL's logged implicit rewards)."""
  return (jax.lax.stop_gradient(beta * (lp.chosen - lp.ref_chosen)),
          jax.lax.stop_gradient(beta * (lp.rejected - lp.ref_rejected)))


def _out(lp: PairedLogps, loss: Array, beta: float, **aux) -> LossOutput:
  cr, rr = _rewards(lp, beta)
  return LossOutput(loss=loss, chosen_rewards=cr, rejected_rewards=rr, aux=aux)


def f_divergence_scores(logratio: Array, f_divergence_type: str = "reverse_kl",
                        f_alpha_divergence_coef: float = 0.5) -> Array:
  """f'(π_θ/π_ref) for f-DPO (Wang et al. 2023, "Beyond Reverse KL", f-DPO objective and its table of f').

  f-DPO replaces the log-ratio inside the DPO loss by f'(u), u = π_θ/π_ref:
    reverse_kl: f'(u) = log u (standard DPO);
    forward_kl: f'(u) = 1 − 1/u (the paper's −1/u plus a constant that cancels
      in the chosen − rejected difference; TRL's form);
    js_divergence: f'(u) = log(2u / (1 + u)) = log 2 + log σ(log u);
    alpha_divergence: f'(u) = (u^(a−1) − 1)/(a − 1) with a =
      `f_alpha_divergence_coef` (TRL's parameterisation; the paper's α-divergence
      f'(u) = (1 − u^(−α))/α is the same with α = 1 − a). The exponent is
      clamped at 80 before exp, as TRL does; a = 1 falls back to reverse KL.

  Args:
    logratio: [B] log u = log π_θ(y|x) − log π_ref(y|x).
    f_divergence_type: one of `F_DIVERGENCES`.
    f_alpha_divergence_coef: a, used by alpha_divergence only.

  Returns:
    [B] scores f'(u).
  """
  if f_divergence_type == "reverse_kl":
    return logratio
  if f_divergence_type == "forward_kl":
    return 1.0 - jnp.exp(-logratio)
  if f_divergence_type == "js_divergence":
    return math.log(2.0) + jax.nn.log_sigmoid(logratio)
  if f_divergence_type == "alpha_divergence":
    a = f_alpha_divergence_coef
    if is_concrete(a) and abs(a - 1.0) < 1e-6:
      return logratio
    t = jnp.minimum((a - 1.0) * logratio, 80.0)
    return (jnp.exp(t) - 1.0) / (a - 1.0)
  raise ValueError(f"Unknown f_divergence_type {f_divergence_type!r}; "
                   f"expected one of {list(F_DIVERGENCES)}.")


def _delta(lp: PairedLogps, f_divergence_type: str, coef: float,
           normalise: bool = False) -> Array:
  """Δ in f-divergence scores; per-token averaged when `normalise`."""
  sc = f_divergence_scores(lp.chosen - lp.ref_chosen, f_divergence_type, coef)
  sr = f_divergence_scores(lp.rejected - lp.ref_rejected, f_divergence_type, coef)
  if normalise:  # TRL clamps the counts at 1, so empty responses give no NaN.
    sc = sc / jnp.maximum(lp.chosen_lengths, 1.0)
    sr = sr / jnp.maximum(lp.rejected_lengths, 1.0)
  return sc - sr


def _only_reverse_kl(name: str, f_divergence_type: str) -> None:
  if f_divergence_type != "reverse_kl":
    raise ValueError(f"loss {name!r} has no f-divergence form; use "
                     "f_divergence_type='reverse_kl'.")


def sigmoid(logps: PairedLogps, *, beta: float = 0.1, label_smoothing: float = 0.0,
            f_divergence_type: str = "reverse_kl",
            f_alpha_divergence_coef: float = 0.5) -> LossOutput:
  """DPO (Rafailov et al. 2023, Eq. 7) and conservative DPO (Mitchell 2023).

  loss = −(1 − ε)·log σ(β·Δ) − ε·log σ(−β·Δ),  ε = `label_smoothing`.
  ε = 0 is DPO; ε > 0 is cDPO ("A note on DPO with noisy preferences", the
  expected DPO loss when labels flip with probability ε). TRL 1.x dropped ε
  from `sigmoid`; with ε = 0 (the default) this equals TRL's `sigmoid`.
  With `f_divergence_type` ≠ reverse_kl, Δ uses f-DPO scores
  (`f_divergence_scores`).

  Args:
    logps: `PairedLogps` with `ref_chosen`, `ref_rejected` ([B] each).
    beta: β, the KL-regularisation strength (applied once, inside σ).
    label_smoothing: ε ∈ [0, 0.5].
    f_divergence_type / f_alpha_divergence_coef: see `f_divergence_scores`.

  Returns:
    `LossOutput` with loss [B], rewards β·Δ_w, β·Δ_l [B].
  """
  lp = _prepare(logps, "sigmoid")
  z = beta * _delta(lp, f_divergence_type, f_alpha_divergence_coef)
  loss = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(z)
          - label_smoothing * jax.nn.log_sigmoid(-z))
  return _out(lp, loss, beta)


def sigmoid_norm(logps: PairedLogps, *, beta: float = 0.1,
                 f_divergence_type: str = "reverse_kl",
                 f_alpha_divergence_coef: float = 0.5) -> LossOutput:
  """Length-normalised DPO (TRL `sigmoid_norm`; DPO Eq. 7 on per-token log-ratios).

  loss = −log σ(β·(Δ_w/|y_w| − Δ_l/|y_l|)), lengths clamped at 1.
  Needs `chosen_lengths`, `rejected_lengths`.
  """
  lp = _prepare(logps, "sigmoid_norm", lengths=True)
  z = beta * _delta(lp, f_divergence_type, f_alpha_divergence_coef, normalise=True)
  return _out(lp, -jax.nn.log_sigmoid(z), beta)


def hinge(logps: PairedLogps, *, beta: float = 0.1,
          f_divergence_type: str = "reverse_kl",
          f_alpha_divergence_coef: float = 0.5) -> LossOutput:
  """Hinge loss on the DPO log-ratio (SLiC, Zhao et al. 2023; RSO, Liu et al. 2024, hinge loss).

  loss = max(0, 1 − β·Δ): 1/β is the margin.
  """
  lp = _prepare(logps, "hinge")
  z = beta * _delta(lp, f_divergence_type, f_alpha_divergence_coef)
  return _out(lp, jax.nn.relu(1.0 - z), beta)


def ipo(logps: PairedLogps, *, beta: float = 0.1, length_normalize: bool = True,
        f_divergence_type: str = "reverse_kl",
        f_alpha_divergence_coef: float = 0.5) -> LossOutput:
  """IPO (Azar et al. 2023, Eq. 17), on length-normalised log-ratios as TRL.

  loss = (Δ_w/|y_w| − Δ_l/|y_l| − 1/(2β))², β is the paper's τ. TRL (and, per
  TRL, the IPO authors' own experiments) average the log-ratios per token; the
  paper writes sequence log-ratios: `length_normalize=False` gives that form,
  (Δ − 1/(2β))². Needs `chosen_lengths`, `rejected_lengths` (clamped at 1)
  when normalising.
  """
  lp = _prepare(logps, "ipo", lengths=length_normalize)
  d = _delta(lp, f_divergence_type, f_alpha_divergence_coef, normalise=length_normalize)
  return _out(lp, (d - 1.0 / (2.0 * beta)) ** 2, beta)


def exo_pair(logps: PairedLogps, *, beta: float = 0.1, label_smoothing: float = 1e-3,
             f_divergence_type: str = "reverse_kl",
             f_alpha_divergence_coef: float = 0.5) -> LossOutput:
  """EXO-pref (Ji et al. 2024, "Towards Efficient Exact Optimization...", Eq. 16), K = 2.

  KL(p_θ || p_rh) with p_θ = softmax over {y_w, y_l} of β·Δ_y and the smoothed
  target p_rh = [1 − ε, ε]:
    loss = σ(βΔ)(log σ(βΔ) − log(1 − ε)) + σ(−βΔ)(log σ(−βΔ) − log ε).
  ε = `label_smoothing` must be > 0 (the paper recommends 1e-3, our default;
  TRL has no default and refuses 0).
  """
  if is_concrete(label_smoothing) and not label_smoothing > 0.0:
    raise ValueError("loss 'exo_pair' needs label_smoothing > 0 (EXO recommends 1e-3).")
  lp = _prepare(logps, "exo_pair")
  z = beta * _delta(lp, f_divergence_type, f_alpha_divergence_coef)
  eps = jnp.asarray(label_smoothing, jnp.float32)
  loss = (jax.nn.sigmoid(z) * (jax.nn.log_sigmoid(z) - jnp.log1p(-eps))
          + jax.nn.sigmoid(-z) * (jax.nn.log_sigmoid(-z) - jnp.log(eps)))
  return _out(lp, loss, beta)


def nca_pair(logps: PairedLogps, *, beta: float = 0.1) -> LossOutput:
  """NCA (Chen et al. 2024, "Noise Contrastive Alignment", pairwise NCA loss).

  With r_y = β·Δ_y: loss = −log σ(r_w) − ½ log σ(−r_w) − ½ log σ(−r_l).
  """
  lp = _prepare(logps, "nca_pair")
  rw, rl = beta * (lp.chosen - lp.ref_chosen), beta * (lp.rejected - lp.ref_rejected)
  loss = (-jax.nn.log_sigmoid(rw) - 0.5 * jax.nn.log_sigmoid(-rw)
          - 0.5 * jax.nn.log_sigmoid(-rl))
  return _out(lp, loss, beta)


def robust(logps: PairedLogps, *, beta: float = 0.1, label_smoothing: float = 0.0,
           f_divergence_type: str = "reverse_kl",
           f_alpha_divergence_coef: float = 0.5) -> LossOutput:
  """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO", the rDPO loss).

  Unbiased under label flips with rate ε = `label_smoothing` ∈ [0, 0.5):
    loss = [−(1 − ε) log σ(βΔ) + ε log σ(−βΔ)] / (1 − 2ε).
  """
  if is_concrete(label_smoothing) and not 0.0 <= label_smoothing < 0.5:
    raise ValueError("loss 'robust' needs 0 <= label_smoothing < 0.5.")
  lp = _prepare(logps, "robust")
  z = beta * _delta(lp, f_divergence_type, f_alpha_divergence_coef)
  loss = ((-(1.0 - label_smoothing) * jax.nn.log_sigmoid(z)
           + label_smoothing * jax.nn.log_sigmoid(-z)) / (1.0 - 2.0 * label_smoothing))
  return _out(lp, loss, beta)


def bco_pair(logps: PairedLogps, *, beta: float = 0.1) -> LossOutput:
  """Paired BCO (Jung et al. 2024, "Binary Classifier Optimization", BCE loss without the shift δ).

  Chosen classified as positive, rejected as negative with logits r = β·Δ_y:
    loss = −log σ(r_w) − log σ(−r_l).
  (TRL's `bco_pair` has no reward shift δ; see `unpaired.bco` for the shifted form.)
  """
  lp = _prepare(logps, "bco_pair")
  rw, rl = beta * (lp.chosen - lp.ref_chosen), beta * (lp.rejected - lp.ref_rejected)
  return _out(lp, -jax.nn.log_sigmoid(rw) - jax.nn.log_sigmoid(-rl), beta)


def sppo_hard(logps: PairedLogps, *, beta: float = 0.1) -> LossOutput:
  """SPPO with hard win probabilities (Wu et al. 2024, Eq. 4.7 / Algorithm 1).

  With P(y_w ≻ π) = 1 and P(y_l ≻ π) = 0 and η = 1/β:
    loss = (Δ_w − 1/(2β))² + (Δ_l + 1/(2β))².
  """
  lp = _prepare(logps, "sppo_hard")
  loss = ((lp.chosen - lp.ref_chosen - 0.5 / beta) ** 2
          + (lp.rejected - lp.ref_rejected + 0.5 / beta) ** 2)
  return _out(lp, loss, beta)


def _sorted_smoothed(delta: Array, beta: float, label_smoothing: float) -> Array:
  z = beta * delta
  return (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(z)
          - label_smoothing * jax.nn.log_sigmoid(-z))


def aot(logps: PairedLogps, *, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
  """AOT, paired (Melnyk et al. 2024, "Distributional Preference Alignment via OT", paired AOT objective).

  BATCH-LEVEL op: sorts policy margins m = log π_θ(y_w) − log π_θ(y_l) and
  reference margins m_ref over the batch and compares them quantile by quantile
  (first-order stochastic dominance via 1-D optimal transport):
    loss_i = −(1 − ε) log σ(β(m_(i) − m_ref,(i))) − ε log σ(−β(…)).
  loss[i] therefore belongs to the i-th quantile, not to pair i: only its mean
  is meaningful, and under data sharding the sort must see the whole batch.
  """
  lp = _prepare(logps, "aot")
  m = jnp.sort(lp.chosen - lp.rejected)
  m_ref = jnp.sort(lp.ref_chosen - lp.ref_rejected)
  return _out(lp, _sorted_smoothed(m - m_ref, beta, label_smoothing), beta)


def aot_unpaired(logps: PairedLogps, *, beta: float = 0.1,
                 label_smoothing: float = 0.0) -> LossOutput:
  """AOT, unpaired (Melnyk et al. 2024, unpaired AOT objective).

  BATCH-LEVEL op: sorts the chosen log-ratios Δ_w and rejected log-ratios Δ_l
  separately over the batch and compares the sorted vectors:
    loss_i = −(1 − ε) log σ(β(Δ_w,(i) − Δ_l,(i))) − ε log σ(−β(…)).
  As for `aot`, loss[i] is a quantile, not pair i.
  """
  lp = _prepare(logps, "aot_unpaired")
  dw = jnp.sort(lp.chosen - lp.ref_chosen)
  dl = jnp.sort(lp.rejected - lp.ref_rejected)
  return _out(lp, _sorted_smoothed(dw - dl, beta, label_smoothing), beta)


def apo_zero(logps: PairedLogps, *, beta: float = 0.1) -> LossOutput:
  """APO-zero (D'Oosterlinck et al. 2024, "Anchored Preference Optimization", Eq. 7).

  Push chosen up and rejected down: loss = 1 − σ(βΔ_w) + σ(βΔ_l).
  """
  lp = _prepare(logps, "apo_zero")
  dw, dl = lp.chosen - lp.ref_chosen, lp.rejected - lp.ref_rejected
  return _out(lp, 1.0 - jax.nn.sigmoid(beta * dw) + jax.nn.sigmoid(beta * dl), beta)


def apo_down(logps: PairedLogps, *, beta: float = 0.1) -> LossOutput:
  """APO-down (D'Oosterlinck et al. 2024, Eq. 8).

  Push both down, rejected more: loss = σ(βΔ_w) + 1 − σ(β(Δ_w − Δ_l)).
  """
  lp = _prepare(logps, "apo_down")
  dw, dl = lp.chosen - lp.ref_chosen, lp.rejected - lp.ref_rejected
  return _out(lp, jax.nn.sigmoid(beta * dw) + 1.0 - jax.nn.sigmoid(beta * (dw - dl)), beta)


def discopop(logps: PairedLogps, *, beta: float = 0.1, discopop_tau: float = 0.05,
             f_divergence_type: str = "reverse_kl",
             f_alpha_divergence_coef: float = 0.5) -> LossOutput:
  """DiscoPOP / log-ratio modulated loss (Chris Lu et al. 2024, Eq. 5).

  With z = βΔ and mixing weight w = σ(z/τ), τ = `discopop_tau`:
    loss = (1 − w)·(−log σ(z)) + w·exp(−z).
  """
  lp = _prepare(logps, "discopop")
  z = beta * _delta(lp, f_divergence_type, f_alpha_divergence_coef)
  w = jax.nn.sigmoid(z / discopop_tau)
  return _out(lp, (1.0 - w) * -jax.nn.log_sigmoid(z) + w * jnp.exp(-z), beta)


def rdpo(logps: PairedLogps, *, beta: float = 0.1, alpha: float = 0.01) -> LossOutput:
  """R-DPO, length-regularised DPO (Park et al. 2024, "Disentangling Length from Quality in DPO", the R-DPO objective).

  The length penalty α|y| in the RLHF reward gives the implicit reward
  β·Δ_y + α|y|, hence
    loss = −log σ(β·Δ + α·(|y_w| − |y_l|)).
  A longer chosen response raises the margin and so gets less gradient.
  Needs `chosen_lengths`, `rejected_lengths`.
  """
  lp = _prepare(logps, "rdpo", lengths=True)
  z = beta * (lp.chosen - lp.ref_chosen - lp.rejected + lp.ref_rejected)
  z = z + alpha * (lp.chosen_lengths - lp.rejected_lengths)
  return _out(lp, -jax.nn.log_sigmoid(z), beta)


def dpop(logps: PairedLogps, *, beta: float = 0.1, dpop_lambda: float = 50.0) -> LossOutput:
  """DPO-Positive (Pal et al. 2024, "Smaug", Eq. 3).

  Penalises any drop of the chosen log-prob below the reference's:
    loss = −log σ(β·(Δ − λ·max(0, log π_ref(y_w) − log π_θ(y_w)))).
  """
  lp = _prepare(logps, "dpop")
  penalty = jax.nn.relu(lp.ref_chosen - lp.chosen)
  z = beta * (lp.chosen - lp.ref_chosen - lp.rejected + lp.ref_rejected - dpop_lambda * penalty)
  return _out(lp, -jax.nn.log_sigmoid(z), beta, penalty=penalty)


def sft(logps: PairedLogps, *, beta: float = 0.1) -> LossOutput:
  """TRL's `sft` loss type: NLL of the chosen responses, token mean over the batch.

  loss_i = −log π_θ(y_w,i) · B / Σ_j |y_w,j|, so mean(loss) = −Σ log π / Σ |y|
  exactly as TRL (a BATCH-LEVEL normalisation). Meant to be added to another
  loss (e.g. MPO = sigmoid + bco_pair + sft). Rewards β·Δ as TRL logs them.
  Needs `chosen_lengths`.
  """
  lp = _prepare(logps, "sft", lengths=True)
  tokens = jnp.maximum(jnp.sum(lp.chosen_lengths), 1.0)
  return _out(lp, -lp.chosen * lp.chosen.shape[0] / tokens, beta)
