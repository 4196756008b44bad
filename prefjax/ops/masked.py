"""Masked reductions: per-sequence and per-packed-segment sums of token log-probs.

Shape letters: B batch, R packed rows, T length, S segments per row.

Masks may be boolean or float weights. Masked-out positions contribute exactly
0 even when they hold inf/NaN (e.g. log-probs of padding), because values are
selected with `jnp.where`, not multiplied by 0. Sums are accumulated in at
least float32 (bf16 inputs are upcast).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _acc_dtype(x: jax.Array):
  return jnp.promote_types(x.dtype, jnp.float32)


def _masked_values(x: jax.Array, mask: jax.Array) -> jax.Array:
  """x * mask in float32 (or wider), with exact zeros where mask == 0."""
  if x.shape != mask.shape:
    mask = jnp.broadcast_to(mask, x.shape)
  dt = _acc_dtype(x)
  x = x.astype(dt)
  if mask.dtype == jnp.bool_:
    return jnp.where(mask, x, 0)
  m = mask.astype(dt)
  return jnp.where(m != 0, x * m, 0)


def masked_sum(x: jax.Array, mask: jax.Array, axis: int | tuple[int, ...] = -1) -> jax.Array:
  """Sum of `x * mask` over `axis`, in float32.

  Args:
    x: array, e.g. [B, T] token log-probs.
    mask: same shape as x (or broadcastable), bool or float weights.
    axis: axis or axes to reduce.

  Returns:
    x reduced over `axis` (e.g. [B]), float32 (float64 if x is float64).
  """
  return jnp.sum(_masked_values(x, mask), axis=axis)


def masked_mean(x: jax.Array, mask: jax.Array, axis: int | tuple[int, ...] = -1) -> jax.Array:
  """Mean of x over the positions where mask != 0 (mask-weighted); 0 where the mask is empty.

  Args:
    x: array, e.g. [B, T].
    mask: same shape as x (or broadcastable), bool or float weights.
    axis: axis or axes to reduce.

  Returns:
    `sum(x * mask) / sum(mask)` over `axis`, float32; exactly 0 (not NaN, and
    with zero gradient) where `sum(mask) == 0`.
  """
  total = masked_sum(x, mask, axis)
  count = jnp.sum(jnp.broadcast_to(mask, x.shape).astype(total.dtype), axis=axis)
  nonzero = count != 0
  return jnp.where(nonzero, total / jnp.where(nonzero, count, 1), 0)


def sequence_logps(token_logps: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Summed log-probability of each sequence and its number of scored tokens.

  Args:
    token_logps: [B, T] per-token log-probs (from `token_logps_from_hidden`).
    loss_mask: [B, T] bool/0-1, true on the response tokens that are scored.

  Returns:
    (sums [B] float32, counts [B] float32): `sum_t logp * mask` and `sum_t mask`.
    SimPO / length-normalised losses divide the first by the second.
  """
  if token_logps.shape != loss_mask.shape:
    raise ValueError(f"token_logps {token_logps.shape} and loss_mask {loss_mask.shape} differ")
  sums = masked_sum(token_logps, loss_mask, axis=-1)
  counts = jnp.sum(loss_mask.astype(sums.dtype), axis=-1)
  return sums, counts


def segment_logps(
    token_logps: jax.Array,
    loss_mask: jax.Array,
    segment_ids: jax.Array,
    num_segments: int,
) -> tuple[jax.Array, jax.Array]:
  """Per-segment summed log-probs for packed rows.

  Packing puts several sequences in one row; `segment_ids` numbers them 1..S
  and uses 0 for padding. Segment s goes to column s - 1; segment 0 and ids
  outside [1, S] are dropped.

  Args:
    token_logps: [R, T] per-token log-probs.
    loss_mask: [R, T] bool/0-1 mask of scored tokens.
    segment_ids: [R, T] integer segment ids (0 = padding).
    num_segments: S, the static number of segment columns per row.

  Returns:
    (sums [R, S] float32, counts [R, S] float32).
  """
  if not (token_logps.shape == loss_mask.shape == segment_ids.shape):
    raise ValueError(f"token_logps {token_logps.shape}, loss_mask {loss_mask.shape} and "
                     f"segment_ids {segment_ids.shape} must have the same shape")
  # Zero everything outside the scored segments first: a one-hot matmul would
  # turn NaN/inf in dropped positions into NaN sums (0 * NaN = NaN).
  keep = (loss_mask != 0) & (segment_ids >= 1) & (segment_ids <= num_segments)
  vals = _masked_values(token_logps, jnp.where(keep, loss_mask, 0))  # [R, T]
  m = jnp.where(keep, loss_mask, 0).astype(vals.dtype)               # [R, T]
  cols = jnp.arange(1, num_segments + 1, dtype=segment_ids.dtype)
  onehot = (segment_ids[..., None] == cols).astype(vals.dtype)       # [R, T, S]
  hi = jax.lax.Precision.HIGHEST
  sums = jnp.einsum("RT,RTS->RS", vals, onehot, precision=hi)
  counts = jnp.einsum("RT,RTS->RS", m, onehot, precision=hi)
  return sums, counts
