"""Per-token log-probabilities, including the chunked LM head for huge vocabularies.

Shape letters: B batch (any leading dims are flattened into it), T length,
D model width, V vocabulary, C chunk length along T.

Numerics. Every log-prob is `logit[target] - logsumexp(logits)` evaluated in
float32 (the "selective log-softmax" of tunix, `tunix/rl/common.py`), whatever
the input dtype: bf16 logits are upcast before the reduction, and the LM-head
matmul `hidden @ unembedding.T` accumulates in float32
(`preferred_element_type=float32`) even when its operands are bf16. Gradients
w.r.t. the unembedding are accumulated over chunks in float32 and cast to the
operand dtype once at the end.

Memory. `token_logps_from_hidden` never materialises [B, T, V] logits (DESIGN.md:
a Gemma vocabulary has V = 256k, so float32 logits for B=8, T=1024 are 8 GB and
a naive value_and_grad needs ~21 GB). It scans over chunks of C positions, and
inside each chunk over vocabulary blocks of Vb rows of the unembedding (an
online logsumexp forward; an embarrassingly parallel backward once the forward
logsumexp is saved). The largest temporaries are a few float32 [B, C, Vb]
blocks and one [Vb, D] block; d unembedding is accumulated in place in its
float32 output buffer. The backward pass is a hand-written VJP
(`jax.custom_vjp`) that recomputes each block's logits once and forms
`d logits = g * (onehot(target) - softmax)` directly; the alternative of
differentiating through `jax.checkpoint` + `lax.scan` is kept as
`implementation="checkpoint"` (it supports forward-mode autodiff, but its
scratch is ~2 [B, C, V] blocks plus a second [V, D] buffer: 4.3 GB vs 0.3 GB
at B=8, T=1024, D=2048, V=256k, C=128; see benchmarks/logprobs.py).

Cost: the custom VJP does 4 LM-head-sized matmuls for value_and_grad (forward,
recompute, d hidden, d unembedding) against 3 for the naive version; it wins
back time by never writing or re-reading [B, T, V] arrays.
`implementation="saved_logits"` trades the other way: its forward keeps each
chunk's float32 logits (4·T·V bytes in all, 262 MB for T = 2048, V = 32000) so
its backward does 3 matmuls and no recomputation -- for vocabularies and lengths
where that memory is affordable (2-15% of a T = 1024 train step on the dev CPU,
docs/performance.md).
"""
from __future__ import annotations

import functools
from typing import Any, Literal, Optional

import jax
import jax.numpy as jnp

from prefjax.ops import _chunks


IMPLEMENTATIONS = ("custom_vjp", "saved_logits", "checkpoint")
# "saved_logits" unrolls its chunk loop; longer chunks keep it at most this many.
SAVED_LOGITS_MAX_CHUNKS = 16


def token_logps_from_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Log-probability of each target token under full logits.

  Args:
    logits: [..., T, V] logits in any float dtype (bf16 is upcast).
    targets: [..., T] integer token ids in [0, V).

  Returns:
    [..., T] float32 `logits[target] - logsumexp(logits)`, computed in float32.
  """
  if logits.shape[:-1] != targets.shape:
    raise ValueError(
        f"targets shape {targets.shape} must equal logits shape without V {logits.shape[:-1]}")
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return picked - lse


def token_logps_from_hidden(
    hidden: jax.Array,
    unembedding: jax.Array,
    targets: jax.Array,
    *,
    chunk_size: int = 128,
    logit_softcap: Optional[float] = None,
    compute_dtype: Optional[Any] = None,
    vocab_chunk_size: int = 8192,
    implementation: Literal["custom_vjp", "checkpoint", "saved_logits"] = "custom_vjp",
    where: Optional[jax.Array] = None,
    where_groups: int = 1,
) -> jax.Array:
  """Per-token log-probs of an LM head, chunked along T so [B, T, V] never exists.

  Computes `logits = hidden @ unembedding.T`, optionally Gemma 2 soft-capping
  `c * tanh(logits / c)`, then `log_softmax(logits)[target]`, all as float32,
  C = `chunk_size` positions (times all of B) at a time. Gradients w.r.t.
  `hidden` and `unembedding` are exact (equal to differentiating the naive
  full-logits computation, up to float rounding).

  Args:
    hidden: [B, T, D] final hidden states (any leading dims instead of B).
    unembedding: [V, D] output embedding (Gemma ties it to the input embedding).
    targets: [B, T] integer next-token ids in [0, V).
    chunk_size: C, positions per chunk. T need not be a multiple of C (padded
      internally). With "checkpoint", scratch is ~2 float32 [B, C, V] blocks. With
      "saved_logits", C is lengthened where needed to keep at most
      `SAVED_LOGITS_MAX_CHUNKS` chunks (its chunk loop is unrolled).
    logit_softcap: Gemma 2 final-logit cap (30.0 for Gemma 2), or None.
    compute_dtype: dtype for the matmul operands (e.g. jnp.bfloat16 on TPU);
      default: the promoted dtype of `hidden` and `unembedding`. Accumulation
      and everything after the matmul are float32 regardless.
    vocab_chunk_size: Vb, unembedding rows per block ("custom_vjp" only);
      scratch is a few float32 [B, C, Vb] blocks. V need not be a multiple of
      Vb. If the unembedding is sharded along V, Vb >= V avoids slicing it.
    implementation: "custom_vjp" (default; hand-written backward pass, reverse
      mode only), "saved_logits" (hand-written backward pass that reuses the
      forward's float32 logits, [B, T, V] of them in all, instead of recomputing
      them; `vocab_chunk_size` is ignored) or "checkpoint" (`jax.checkpoint` +
      `lax.scan`, autodiff does the rest; supports forward mode too).
    where: optional [B, T] bool, the positions whose log-prob is needed (e.g. the
      response tokens of a preference pair). Other positions return 0 and get no
      gradient, and the head does not compute them: the needed positions are moved
      to the front (a stable sort, within each of `where_groups` groups of rows),
      the compacted rows are cut into chunks of C, and chunks holding no needed
      position are skipped (`lax.cond`) in the forward and backward passes. So the
      work follows the number of needed positions, rounded up to a chunk, instead
      of B * T (prompt and padding tokens are typically a third to a half of a
      preference batch). C then counts compacted positions per group.
    where_groups: G, how many groups of rows are compacted separately (must divide
      the flattened batch). 1 compacts the whole batch; set it to the number of
      batch shards so that the sort and gather stay within each shard.

  Returns:
    [B, T] float32 log-probabilities (0 where `where` is False).
  """
  _chunks.check_head(hidden, unembedding)
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown implementation {implementation!r}; "
                     f"expected one of {IMPLEMENTATIONS}")
  if targets.shape != hidden.shape[:-1]:
    raise ValueError(f"targets shape {targets.shape} must equal hidden shape without D "
                     f"{hidden.shape[:-1]}")
  if compute_dtype is None:
    compute_dtype = jnp.result_type(hidden, unembedding)
  cap = None if logit_softcap is None else float(logit_softcap)
  h, lead = _chunks.flatten_lead(hidden.astype(compute_dtype), 2)
  t, _ = _chunks.flatten_lead(targets.astype(jnp.int32), 1)
  w = unembedding.astype(compute_dtype)
  if where is not None:
    if where.shape != targets.shape:
      raise ValueError(f"where shape {where.shape} must equal targets shape {targets.shape}")
    out = _compacted_logps(h, w, t, where.reshape(t.shape).astype(bool), chunk_size, cap,
                           vocab_chunk_size, implementation, where_groups)
    return out.reshape(lead + (t.shape[1],))
  seq_len = h.shape[1]
  c = _chunk_len(seq_len, chunk_size, implementation)
  h_chunks = _chunks.to_chunks(h, c)  # [n, N, C, D]
  t_chunks = _chunks.to_chunks(t, c)  # [n, N, C]
  out = _scan_logps(h_chunks, w, t_chunks, None, cap, vocab_chunk_size, implementation)
  return _chunks.from_chunks(out, seq_len).reshape(lead + (seq_len,))


def _compacted_logps(h, w, t, where, chunk_size, cap, vblock, implementation, groups):
  """[N, T, D], [V, D], [N, T], bool [N, T] -> [N, T] log-probs of the `where` positions only.

  Within each of `groups` groups of N / groups rows, a stable argsort puts the needed
  positions first; the [G, M, D] compacted hidden states are chunked along M and chunks
  past the largest group's count are skipped. The gather / un-permute are differentiated
  by autodiff (a scatter-add of d hidden back to the original positions).
  """
  n_rows, seq_len = t.shape
  if groups < 1 or n_rows % groups:
    raise ValueError(f"where_groups={groups} must be >= 1 and divide the {n_rows} rows")
  m = n_rows // groups * seq_len
  h_g = h.reshape(groups, m, h.shape[-1])
  t_g, w_g = t.reshape(groups, m), where.reshape(groups, m)
  order = jnp.argsort(jnp.logical_not(w_g), axis=1, stable=True)  # needed positions first
  h_s = jnp.take_along_axis(h_g, order[..., None], axis=1)
  t_s = jnp.take_along_axis(t_g, order, axis=1)
  c = _chunk_len(m, chunk_size, implementation)
  h_chunks, t_chunks = _chunks.to_chunks(h_s, c), _chunks.to_chunks(t_s, c)  # [n, G, C, ...]
  most = jnp.max(jnp.sum(w_g, axis=1, dtype=jnp.int32))
  active = jnp.arange(h_chunks.shape[0], dtype=jnp.int32) * c < most
  out = _scan_logps(h_chunks, w, t_chunks, active, cap, vblock, implementation)
  lp_s = _chunks.from_chunks(out, m)  # [G, M] in sorted order
  lp = jnp.take_along_axis(lp_s, jnp.argsort(order, axis=1), axis=1)
  return jnp.where(w_g, lp, 0.0).reshape(n_rows, seq_len)


def _chunk_len(seq_len: int, chunk_size: int, implementation: str) -> int:
  """Positions per chunk: `chunk_size`, lengthened for "saved_logits" so that its unrolled
  loop has at most `SAVED_LOGITS_MAX_CHUNKS` chunks."""
  c = _chunks.chunk_len(seq_len, chunk_size)
  if implementation == "saved_logits":
    c = max(c, -(-seq_len // SAVED_LOGITS_MAX_CHUNKS))
  return c


def _scan_logps(h_chunks, w, t_chunks, active, cap, vblock, implementation):
  """[n, N, C, D] chunks -> [n, N, C] log-probs; `active` skips chunks ("custom_vjp" only;
  "checkpoint" computes every chunk, and the caller masks what it does not need)."""
  if implementation == "custom_vjp":
    return _scan_logps_custom_vjp(h_chunks, w, t_chunks, active, cap, vblock)
  if implementation == "saved_logits":
    return _scan_logps_saved_logits(h_chunks, w, t_chunks, active, cap)
  return _scan_logps_checkpoint(h_chunks, w, t_chunks, cap)


def _chunk_logps_and_lse(h_c, w, t_c, cap):
  """One chunk: [N, C, D], [V, D], [N, C] -> float32 log-probs [N, C] and logsumexp [N, C]."""
  return _chunk_logps_from_logits(_chunks.chunk_logits(h_c, w, cap), t_c)


def _chunk_logps_from_logits(z, t_c):
  """float32 logits [N, C, V], targets [N, C] -> log-probs and logsumexp [N, C]."""
  lse = jax.nn.logsumexp(z, axis=-1)
  return jnp.take_along_axis(z, t_c[..., None], axis=-1)[..., 0] - lse, lse


def _scan_logps_checkpoint(h_chunks, w, t_chunks, cap):
  """Reference chunked path: autodiff through `lax.scan` of a rematerialised body."""

  @jax.checkpoint
  def body(carry, xs):
    h_c, t_c = xs
    logp, _ = _chunk_logps_and_lse(h_c, w, t_c, cap)
    return carry, logp

  _, out = jax.lax.scan(body, None, (h_chunks, t_chunks))
  return out


def _fold_vocab_blocks(fn, carry, w: jax.Array, block: int):
  """carry = fn(carry, w[lo:lo+Vb], lo) over vocabulary blocks covering [0, V).

  Full blocks run in a `lax.fori_loop` with dynamic slices (a static slice of W
  inside a scan would be hoisted out of the loop by XLA, copying all of W); a
  shorter last block, if any, is handled once after the loop.
  """
  if block <= 0:
    raise ValueError(f"vocab_chunk_size must be positive, got {block}")
  vocab = w.shape[0]
  block = min(block, vocab)
  n_full = vocab // block

  def step(i, c):
    lo = i * block
    return fn(c, jax.lax.dynamic_slice_in_dim(w, lo, block, axis=0), lo)

  if n_full == 1:
    carry = fn(carry, w[:block], 0)
  else:
    carry = jax.lax.fori_loop(0, n_full, step, carry)
  if n_full * block < vocab:
    carry = fn(carry, w[n_full * block:], n_full * block)
  return carry


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _scan_logps_custom_vjp(h_chunks, w, t_chunks, active, cap, vblock):
  """[n, N, C, D], [V, D], [n, N, C], bool [n] or None -> float32 [n, N, C] log-probs.

  Chunks whose `active` entry is False are skipped (`lax.cond`; log-prob 0, no gradient);
  None runs every chunk with no `cond` (which could make XLA copy the carried d W)."""
  return _logps_fwd(h_chunks, w, t_chunks, active, cap, vblock)[0]


def _logps_fwd(h_chunks, w, t_chunks, active, cap, vblock):
  """Scan over T chunks; inside, an online logsumexp over vocabulary blocks.

  Chunks with `active` False are skipped (log-prob 0, logsumexp 0)."""
  def body(carry, xs):
    h_c, t_c, on = xs
    if on is None:
      return carry, _chunk_fwd(h_c, t_c)
    zeros = jnp.zeros(t_c.shape, jnp.float32)
    return carry, jax.lax.cond(on, lambda: _chunk_fwd(h_c, t_c), lambda: (zeros, zeros))

  def _chunk_fwd(h_c, t_c):

    def block(acc, w_b, lo):
      lse, picked = acc
      z = _chunks.chunk_logits(h_c, w_b, cap)                # [N, C, Vb] float32
      lse = jnp.logaddexp(lse, jax.nn.logsumexp(z, axis=-1))
      idx = jnp.clip(t_c - lo, 0, w_b.shape[0] - 1)
      z_t = jnp.take_along_axis(z, idx[..., None], axis=-1)[..., 0]
      picked = jnp.where((t_c >= lo) & (t_c < lo + w_b.shape[0]), z_t, picked)
      return lse, picked

    init = (jnp.full(t_c.shape, -jnp.inf, jnp.float32), jnp.zeros(t_c.shape, jnp.float32))
    lse, picked = _fold_vocab_blocks(block, init, w, vblock)
    return picked - lse, lse

  _, (logp, lse) = jax.lax.scan(body, None, (h_chunks, t_chunks, active))
  # Residuals are the (small) inputs and the [n, N, C] logsumexp; no logits.
  return logp, (h_chunks, w, t_chunks, active, lse)


def _logps_bwd(cap, vblock, res, g):
  """VJP: d logp / d z = onehot(target) - softmax(z); chain through softcap and matmul.

  With the forward logsumexp saved, each (T chunk, vocabulary block) is
  independent: recompute its logits, form d logits, add `d logits @ W_block` to
  d hidden and add `hidden^T @ d logits` into columns [lo, hi) of d W^T in place.
  """
  h_chunks, w, t_chunks, active, lse = res

  def body(dw, xs):
    h_c, t_c, lse_c, g_c, on = xs
    if on is None:
      return _chunk_bwd(dw, h_c, t_c, lse_c, g_c)
    skip = lambda dw: (dw, jnp.zeros(h_c.shape, h_c.dtype))  # noqa: E731
    return jax.lax.cond(on, lambda dw: _chunk_bwd(dw, h_c, t_c, lse_c, g_c), skip, dw)

  def _chunk_bwd(dw, h_c, t_c, lse_c, g_c):

    def block(acc, w_b, lo):
      dw, dh_c = acc
      x = jnp.einsum("NCD,VD->NCV", h_c, w_b, preferred_element_type=jnp.float32)
      if cap is None:
        z = x
      else:
        th = jnp.tanh(x / cap)
        z = cap * th
      p = jnp.exp(z - lse_c[..., None])
      onehot = jax.lax.broadcasted_iota(jnp.int32, z.shape, 2) + lo == t_c[..., None]
      dz = g_c[..., None] * (onehot.astype(jnp.float32) - p)
      if cap is not None:
        dz = dz * (1.0 - th * th)  # d(c tanh(x/c))/dx
      dz = dz.astype(w.dtype)
      dh_c = dh_c + jnp.einsum("NCV,VD->NCD", dz, w_b, preferred_element_type=jnp.float32)
      dw_b = jnp.einsum("NCD,NCV->DV", h_c, dz, preferred_element_type=jnp.float32)
      cols = jax.lax.dynamic_slice_in_dim(dw, lo, w_b.shape[0], axis=1)
      dw = jax.lax.dynamic_update_slice_in_dim(dw, cols + dw_b, lo, axis=1)
      return dw, dh_c

    dw, dh_c = _fold_vocab_blocks(block, (dw, jnp.zeros(h_c.shape, jnp.float32)), w, vblock)
    return dw, dh_c.astype(h_c.dtype)

  dw0 = jnp.zeros(w.shape[::-1], jnp.float32)  # d W^T [D, V]: see `_saved_bwd`
  g = g.astype(jnp.float32)
  dwt, dh = jax.lax.scan(body, dw0, (h_chunks, t_chunks, lse, g, active))
  return dh, dwt.T.astype(w.dtype), None, None


_scan_logps_custom_vjp.defvjp(_logps_fwd, _logps_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _scan_logps_saved_logits(h_chunks, w, t_chunks, active, cap):
  """As `_scan_logps_custom_vjp`, keeping every chunk's logits for the backward pass.

  [n, N, C, D], [V, D], [n, N, C], bool [n] or None -> float32 [n, N, C] log-probs; the
  residuals are the n float32 [N, C, V] (soft-capped) logits, so the backward pass is
  d hidden = d z @ W and d W = d z^T @ hidden per chunk with no LM-head recomputation.

  The chunks are a Python loop (n is small: `token_logps_from_hidden` caps it at
  `SAVED_LOGITS_MAX_CHUNKS`), not a `lax.scan`: a scan would stack the logits into one
  [n, N, C, V] loop buffer, which XLA:CPU zero-fills and writes chunk by chunk (about 4%
  of a T = 2048 train step in the profile, docs/performance.md), where separate chunks
  are written once by their matmul."""
  return _saved_fwd(h_chunks, w, t_chunks, active, cap)[0]


def _saved_fwd(h_chunks, w, t_chunks, active, cap):
  def chunk(h_c, t_c):
    z = _chunks.chunk_logits(h_c, w, cap)  # [N, C, V] float32
    return _chunk_logps_from_logits(z, t_c) + (z,)

  def skipped(t_c):
    zeros = jnp.zeros(t_c.shape, jnp.float32)
    return zeros, zeros, jnp.zeros(t_c.shape + (w.shape[0],), jnp.float32)

  logps, lses, zs = [], [], []
  for i in range(h_chunks.shape[0]):
    h_c, t_c = h_chunks[i], t_chunks[i]
    if active is None:
      logp, lse, z = chunk(h_c, t_c)
    else:
      logp, lse, z = jax.lax.cond(active[i], chunk, lambda h_c, t_c: skipped(t_c), h_c, t_c)
    logps.append(logp)
    lses.append(lse)
    zs.append(z)
  return jnp.stack(logps), (h_chunks, w, t_chunks, active, jnp.stack(lses), tuple(zs))


def _saved_bwd(cap, res, g):
  """d z = g * (onehot(target) - softmax(z)) (times 1 - tanh² under soft-capping, with
  tanh = z / c read off the saved capped logits), then both matmuls per chunk; d W is
  accumulated transposed ([D, V] += hidden^T @ d z, which XLA:CPU runs without
  transposing the [C, V] d z) and transposed once at the end."""
  h_chunks, w, t_chunks, active, lse, zs = res
  g = g.astype(jnp.float32)

  def chunk(dwt, h_c, t_c, lse_c, g_c, z):
    p = jnp.exp(z - lse_c[..., None])
    onehot = jax.lax.broadcasted_iota(jnp.int32, z.shape, 2) == t_c[..., None]
    dz = g_c[..., None] * (onehot.astype(jnp.float32) - p)
    if cap is not None:
      th = z / cap
      dz = dz * (1.0 - th * th)
    dz = dz.astype(w.dtype)
    dh_c = jnp.einsum("NCV,VD->NCD", dz, w, preferred_element_type=jnp.float32)
    dwt = dwt + jnp.einsum("NCD,NCV->DV", h_c, dz, preferred_element_type=jnp.float32)
    return dwt, dh_c.astype(h_c.dtype)

  dwt = jnp.zeros(w.shape[::-1], jnp.float32)
  dhs = []
  for i, z in enumerate(zs):
    args = (h_chunks[i], t_chunks[i], lse[i], g[i], z)
    if active is None:
      dwt, dh_c = chunk(dwt, *args)
    else:
      skip = lambda dwt, h_c, *_: (dwt, jnp.zeros(h_c.shape, h_c.dtype))  # noqa: E731
      dwt, dh_c = jax.lax.cond(active[i], chunk, skip, dwt, *args)
    dhs.append(dh_c)
  return jnp.stack(dhs), dwt.T.astype(w.dtype), None, None


_scan_logps_saved_logits.defvjp(_saved_fwd, _saved_bwd)
