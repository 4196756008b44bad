"""Shared plumbing for ops that scan over chunks of the sequence axis.

The vocabulary-sized ops (`logprobs`, `diagnostics`) never build float32
logits for a whole [B, T, V] batch: they split T into chunks of C positions and
run a `lax.scan` over the chunks, so at most a [B, C, V] block lives at a time.
These helpers do the bookkeeping: flatten leading dims into B, pad T up to a
multiple of C, move the chunk axis to the front for `lax.scan`, and undo it all.
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp


def softcap(x: jax.Array, cap: Optional[float]) -> jax.Array:
  """Gemma 2 logit soft-capping `cap * tanh(x / cap)`; identity when cap is None.

  Gemma 2 (Gemma Team, 2024, "Gemma 2: Improving Open Language Models at a
  Practical Size", arXiv:2408.00118) caps final logits at 30.
  """
  if cap is None:
    return x
  return cap * jnp.tanh(x / cap)


def chunk_len(seq_len: int, chunk_size: int) -> int:
  """Chunk length actually used: `chunk_size`, but never longer than T."""
  if chunk_size <= 0:
    raise ValueError(f"chunk_size must be positive, got {chunk_size}")
  return max(1, min(chunk_size, seq_len))


def flatten_lead(x: jax.Array, trailing: int) -> tuple[jax.Array, tuple[int, ...]]:
  """Reshapes [..., *rest] (len(rest) == trailing) to [N, *rest]; returns the lead shape."""
  lead = x.shape[: x.ndim - trailing]
  return x.reshape((math.prod(lead),) + x.shape[x.ndim - trailing:]), lead


def to_chunks(x: jax.Array, c: int) -> jax.Array:
  """[N, T, *rest] -> [n, N, C, *rest] with T zero-padded to n * C (n = ceil(T / C))."""
  n_tok = x.shape[1]
  n = -(-n_tok // c)
  pad = n * c - n_tok
  if pad:
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
  x = x.reshape((x.shape[0], n, c) + x.shape[2:])
  return jnp.swapaxes(x, 0, 1)


def from_chunks(y: jax.Array, seq_len: int) -> jax.Array:
  """[n, N, C, *rest] -> [N, T, *rest], dropping the padding added by `to_chunks`."""
  y = jnp.swapaxes(y, 0, 1)
  y = y.reshape((y.shape[0], y.shape[1] * y.shape[2]) + y.shape[3:])
  return y[:, :seq_len]


def check_head(hidden: jax.Array, unembedding: jax.Array, name: str = "hidden") -> None:
  """Checks hidden [..., T, D] against unembedding [V, D]."""
  if hidden.ndim < 2:
    raise ValueError(f"{name} must be [..., T, D], got shape {hidden.shape}")
  if unembedding.ndim != 2 or unembedding.shape[1] != hidden.shape[-1]:
    raise ValueError(
        f"unembedding must be [V, D] with D = {name}.shape[-1] = {hidden.shape[-1]}, "
        f"got shape {unembedding.shape}")


def chunk_logits(h_c: jax.Array, w: jax.Array, cap: Optional[float]) -> jax.Array:
  """[..., C, D] x [V, D] -> float32 [..., C, V] logits (f32 accumulation), soft-capped."""
  x = jnp.einsum("...CD,VD->...CV", h_c, w, preferred_element_type=jnp.float32)
  return softcap(x, cap)
