"""Batch metrics for the losses (TRL's metric names)."""
import jax.numpy as jnp

from prefjax.losses.types import Array, LossOutput, PairedLogps, UnpairedLogps, UnpairedLossOutput


def _mean(x: Array, mask: Array | None) -> Array:
  x = jnp.asarray(x, jnp.float32)
  if mask is None:
    return jnp.mean(x)
  m = jnp.asarray(mask, jnp.float32)
  return jnp.sum(jnp.where(m > 0, x, 0.0) * m) / jnp.maximum(jnp.sum(m), 1.0)


def paired_metrics(logps: PairedLogps, out: LossOutput, mask: Array | None = None) -> dict:
  """Scalar metrics for any paired loss, as TRL's DPOTrainer logs them.

  Keys: `rewards/chosen`, `rewards/rejected`, `rewards/margins`
  (mean of chosen − rejected reward), `rewards/accuracies` (fraction with
  chosen reward > rejected reward, strictly), `logps/chosen`, `logps/rejected`
  (mean summed log-probs). All are means over the batch, restricted to
  `mask` [B] (1 = real pair, 0 = padding) when given; an all-zero mask gives 0.

  Returns:
    dict of float32 scalars.
  """
  margins = out.chosen_rewards - out.rejected_rewards
  return {
      "rewards/chosen": _mean(out.chosen_rewards, mask),
      "rewards/rejected": _mean(out.rejected_rewards, mask),
      "rewards/margins": _mean(margins, mask),
      "rewards/accuracies": _mean(margins > 0, mask),
      "logps/chosen": _mean(logps.chosen, mask),
      "logps/rejected": _mean(logps.rejected, mask),
  }


def unpaired_metrics(logps: UnpairedLogps, out: UnpairedLossOutput,
                     mask: Array | None = None) -> dict:
  """KTO/BCO metrics: mean rewards and log-probs of desirable / undesirable examples.

  Keys: `rewards/chosen`, `rewards/rejected`, `rewards/margins` (difference of
  the two means, as TRL's KTOTrainer), `logps/chosen`, `logps/rejected`, and
  `kl` / `delta` when the loss returned them. Classes absent from the batch
  give 0. `mask` [B] excludes padded examples.
  """
  label = jnp.asarray(logps.label).astype(bool)
  valid = jnp.ones(label.shape, bool) if mask is None else jnp.asarray(mask) > 0
  des, und = label & valid, (~label) & valid
  m = {
      "rewards/chosen": _mean(out.rewards, des),
      "rewards/rejected": _mean(out.rewards, und),
      "logps/chosen": _mean(logps.logps, des),
      "logps/rejected": _mean(logps.logps, und),
  }
  m["rewards/margins"] = m["rewards/chosen"] - m["rewards/rejected"]
  for k in ("kl", "delta"):
    if k in out.aux:
      m[k] = jnp.asarray(out.aux[k], jnp.float32)
  return m
