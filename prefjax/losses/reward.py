"""Explicit reward-model losses and reward transformations.

Scores are reward-model outputs (one scalar per response) in any float dtype;
all maths is float32.
"""
import jax
import jax.numpy as jnp

from prefjax.losses.types import Array


def _f32(x) -> Array:
  return jnp.asarray(x, jnp.float32)


def bradley_terry(chosen_scores: Array, rejected_scores: Array,
                  margin: Array | None = None) -> Array:
  """Bradley–Terry pairwise loss (Bradley & Terry 1952; Ouyang et al. 2022, Eq. 1).

    loss = −log σ(r_w − r_l − m)
  with the optional Llama-2 margin m (Touvron et al. 2023, Eq. 2): a larger m
  for pairs rated as clearly better. Equals TRL's RewardTrainer loss per pair.

  Args:
    chosen_scores: [B] r(x, y_w).
    rejected_scores: [B] r(x, y_l).
    margin: [B] or scalar m, or None (m = 0).

  Returns:
    [B] per-pair loss.
  """
  d = _f32(chosen_scores) - _f32(rejected_scores)
  if margin is not None:
    d = d - _f32(margin)
  return -jax.nn.log_sigmoid(d)


def reward_centering(chosen_scores: Array, rejected_scores: Array) -> Array:
  """Reward-centering penalty (Eisenstein et al. 2023, "Helping or Herding?"), as TRL.

  (r_w + r_l)² per pair [B]; its mean is TRL's `mean((r_w + r_l)²)`, pushing the
  rewards towards zero mean (BT is invariant to a shift, so this pins it).
  """
  return (_f32(chosen_scores) + _f32(rejected_scores)) ** 2


def reward_model_loss(chosen_scores: Array, rejected_scores: Array, *,
                      margin: Array | None = None,
                      center_rewards_coefficient: float | None = None) -> Array:
  """TRL RewardTrainer's loss per pair: BT (with margin) + c·(r_w + r_l)².

  mean(reward_model_loss(...)) equals `RewardTrainer.compute_loss`.
  `center_rewards_coefficient` is TRL's name (default None = off; the paper
  suggests 0.01).

  Returns:
    [B] per-pair loss.
  """
  loss = bradley_terry(chosen_scores, rejected_scores, margin)
  if center_rewards_coefficient is not None:
    loss = loss + center_rewards_coefficient * reward_centering(chosen_scores, rejected_scores)
  return loss


def kwise_ranking(scores: Array, targets: Array, mask: Array | None = None, *,
                  lower_is_better: bool = False) -> Array:
  """K-wise ranking loss (InstructGPT, Ouyang et al. 2022, Eq. 1).

  For each prompt with K ranked responses, every one of the C(K, 2) pairs is a
  BT comparison, and the prompt's loss is
    loss = −1/C(K, 2) · Σ_{(i, j): y_i ≻ y_j} log σ(r_i − r_j).
  Ragged K: `mask` marks valid responses and K is counted per row; rows with
  K < 2 give 0. Ties in `targets` are not pairs (they add nothing to the sum).

  Args:
    scores: [B, K] reward-model scores r.
    targets: [B, K] target scores (higher = better), or ranks with
      `lower_is_better=True` (e.g. 0 = best).
    mask: [B, K] 1 for valid responses; None = all valid.
    lower_is_better: whether smaller `targets` are better (ranks).

  Returns:
    [B] per-prompt loss.
  """
  s, t = _f32(scores), _f32(targets)
  if lower_is_better:
    t = -t
  m = jnp.ones_like(s) if mask is None else _f32(mask)
  better = (t[:, :, None] > t[:, None, :]) & (m[:, :, None] > 0) & (m[:, None, :] > 0)
  pair_loss = -jax.nn.log_sigmoid(s[:, :, None] - s[:, None, :])
  total = jnp.sum(jnp.where(better, pair_loss, 0.0), axis=(1, 2))
  k = jnp.sum(m, axis=1)
  n_pairs = k * (k - 1.0) / 2.0
  return jnp.where(n_pairs > 0, total / jnp.maximum(n_pairs, 1.0), 0.0)


def log_sigmoid_transform(rewards: Array, reference_rewards: Array) -> Array:
  """u = log σ(r − r_ref) (Wang et al. 2024, "Transforming and Combining Rewards for Aligning LLMs").

  r_ref is the reward of a reference response for the same prompt (e.g. the
  SFT policy's), so u is the log-probability that y beats it: it saturates for
  already-good responses and makes sums act like a logical AND.

  Returns:
    u, broadcast of `rewards` and `reference_rewards`.
  """
  return jax.nn.log_sigmoid(_f32(rewards) - _f32(reference_rewards))


def combine_transformed_rewards(rewards: Array, reference_rewards: Array,
                                weights: Array | None = None) -> Array:
  """Sum of transformed rewards over M reward models (Wang et al. 2024, the "sum of transformed rewards" aggregation).

    R(x, y) = Σ_m w_m · log σ(r_m(x, y) − r_m,ref(x))     (w_m = 1 in the paper)

  Args:
    rewards: [B, M] one column per reward model.
    reference_rewards: [B, M] or [M] reference rewards per model.
    weights: [M] or None (all ones).

  Returns:
    [B] combined reward.
  """
  u = log_sigmoid_transform(rewards, reference_rewards)
  w = jnp.ones(u.shape[-1], jnp.float32) if weights is None else _f32(weights)
  return jnp.sum(u * w, axis=-1)


def combine_heads(head_rewards: Array, weights: Array) -> Array:
  """Multi-head (multi-aspect) reward: r = Σ_h w_h · r_h.

  Args:
    head_rewards: [..., H] one reward per aspect head (helpfulness, safety, ...).
    weights: [H] aspect weights.

  Returns:
    [...] scalar reward per response; feed chosen and rejected to
    `bradley_terry` for a BT loss on the combined reward.
  """
  return jnp.sum(_f32(head_rewards) * _f32(weights), axis=-1)


def multi_head_bradley_terry(chosen_heads: Array, rejected_heads: Array,
                             margin: Array | None = None) -> Array:
  """Independent BT loss per aspect head: [B, H] scores -> [B, H] losses.

  For pairs labelled per aspect; margin [B, H], [H] or None.
  """
  return bradley_terry(chosen_heads, rejected_heads, margin)
