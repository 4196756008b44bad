"""Attention kernels: softmax attention over [B, T, K, G, H] queries with hand-written backward passes.

`attend` (one block, probabilities saved), `blocked_attention` (query blocks, rematerialised),
`causal_blocked_attention` / `causal_flash_attention` (causal blocks that skip the keys after
each block's last slot; FlashAttention-2's backward) and `attend_reference` (autodiff, the
oracle the tests compare against). `window_attention.py` adds per-row key windows.

Shape letters as in layers.py: B batch, T query length, S key length, K kv heads, G = N / K
query heads per kv head, H head dim; kv-major tensors are [B, K, M, ...] with M = T * G.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from prefjax.models.mixed_einsum import contract

# Large negative logit for masked keys (Gemma's K_MASK); finite so fully-masked rows stay finite.
K_MASK = -2.3819763e38


def _attention_scores(q: jax.Array, key: jax.Array, softcap: float | None
                      ) -> tuple[jax.Array, jax.Array | None]:
  """q [B,K,M,H] (M = T*G), key [B,K,S,H] -> float32 scores [B,K,M,S] (soft-capped when
  `softcap`) and tanh(s / c) for the VJP."""
  logits = jnp.einsum("BKMH,BKSH->BKMS", q, key, preferred_element_type=jnp.float32)
  if softcap is None:
    return logits, None
  th = jnp.tanh(logits / softcap)
  return th * softcap, th


def _row_dot(a: jax.Array, b: jax.Array) -> jax.Array:
  """[..., M, H] x2 -> float32 [..., M, 1] row-wise dot products (rowsum(dO * O)).

  An einsum, not `sum(a * b, -1)`: XLA:CPU ran the multiply-reduce over H = 64 at a
  twentieth of the speed of the equivalent batched dot (32 vs 1.5 ms at [2, 1, 32768, 64])."""
  return jnp.einsum("...H,...H->...", a, b, preferred_element_type=jnp.float32)[..., None]


def _kv_major_mask(mask: jax.Array, g: int) -> jax.Array:
  """[B,T,S] -> [B,1,T*G,S] (each query row repeated for the G heads sharing a KV head)."""
  b, t, s = mask.shape
  return jnp.broadcast_to(mask[:, None, :, None, :], (b, 1, t, g, s)).reshape(b, 1, t * g, s)


def _masked_scores(q, k, mask_b, g, softcap):
  """kv-major q [B,K,M,H], k [B,K,S,H], mask [B,T,S] -> float32 scores with masked keys at
  K_MASK, and tanh(s / c) (None without soft-capping)."""
  logits, th = _attention_scores(q, k, softcap)
  return jnp.where(_kv_major_mask(mask_b, g), logits, K_MASK), th


def _to_kv_major(qg: jax.Array, key: jax.Array, val: jax.Array):
  """[B,T,K,G,H], [B,S,K,H] x2 -> [B,K,T*G,H], [B,K,S,H] x2.

  In this layout every attention matmul is a plain batched GEMM over (B, K) with the T*G
  query rows contiguous, and the big [B,K,M,S] tensors are never transposed."""
  return _q_to_kv_major(qg), _swap_length_heads(key), _swap_length_heads(val)


def _q_to_kv_major(x: jax.Array) -> jax.Array:
  """[B,T,K,G,H] -> [B,K,T*G,H] (queries, or their cotangents)."""
  b, t, k, g, h = x.shape
  return jnp.transpose(x, (0, 2, 1, 3, 4)).reshape(b, k, t * g, h)


def _swap_length_heads(x: jax.Array) -> jax.Array:
  """[B,S,K,H] <-> [B,K,S,H] (keys, values and their gradients)."""
  return jnp.transpose(x, (0, 2, 1, 3))


def _from_kv_major(x: jax.Array, t: int, g: int) -> jax.Array:
  """[B,K,T*G,H] -> [B,T,K,G,H]."""
  b, k, _, h = x.shape
  return jnp.transpose(x.reshape(b, k, t, g, h), (0, 2, 1, 3, 4))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def attend(qg: jax.Array, key: jax.Array, val: jax.Array, mask: jax.Array,
           softcap: float | None) -> jax.Array:
  """Softmax attention: qg [B,T,K,G,H], key/val [B,S,K,H], mask [B,T,S] -> [B,T,K,G,H].

  Scores in float32 (Gemma 2 soft-capping `c * tanh(s / c)` when `softcap`). A row with no
  allowed key (a padding query) averages all values, as with Gemma's finite K_MASK.

  The backward pass is written out (`jax.custom_vjp`) in the form of FlashAttention
  (Dao et al. 2022, arXiv:2205.14135, Alg. 4, here without tiling): with P the saved
  probabilities and O the output, dS = P * (dP - rowsum(dO * O)) takes one fused pass over
  the [B,K,T*G,S] tensors, where autodiff of softmax needs a reduction over P * dP plus a
  second pass, and XLA:CPU lowered the d V contraction over (T, G) to a multiply-reduce
  (docs/performance.md).
  """
  return _attend_fwd(qg, key, val, mask, softcap)[0]


def _attend_fwd(qg, key, val, mask, softcap):
  t, g = qg.shape[1], qg.shape[3]
  q, k, v = _to_kv_major(qg, key, val)
  scores, _ = _masked_scores(q, k, mask, g, softcap)
  probs = jax.nn.softmax(scores, axis=-1)
  out = contract("BKMS,BKSH->BKMH", probs.astype(v.dtype), v)
  return _from_kv_major(out, t, g), (q, k, v, mask, probs, out)


def _attend_bwd(softcap, res, d_out):
  q, k, v, mask, probs, out = res
  t, g = d_out.shape[1], d_out.shape[3]
  do = _q_to_kv_major(d_out)
  d_v = contract("BKMS,BKMH->BKSH", probs.astype(do.dtype), do)
  d_probs = jnp.einsum("BKMH,BKSH->BKMS", do, v, preferred_element_type=jnp.float32)
  delta = _row_dot(do, out)
  d_logits = probs * (d_probs - delta)
  if softcap is not None:
    _, th = _attention_scores(q, k, softcap)  # recomputed rather than saved
    d_logits = d_logits * (1.0 - th * th)
  d_logits = jnp.where(_kv_major_mask(mask, g), d_logits, 0.0).astype(q.dtype)
  d_q = contract("BKMS,BKSH->BKMH", d_logits, k)
  d_k = contract("BKMS,BKMH->BKSH", d_logits, q)
  return _from_kv_major(d_q, t, g), _swap_length_heads(d_k), _swap_length_heads(d_v), None


attend.defvjp(_attend_fwd, _attend_bwd)


def attend_reference(qg: jax.Array, key: jax.Array, val: jax.Array, mask: jax.Array,
                     softcap: float | None) -> jax.Array:
  """`attend` with autodiff's backward pass (the reference the custom VJP is tested against)."""
  logits = jnp.einsum("BTKGH,BSKH->BTKGS", qg, key, preferred_element_type=jnp.float32)
  if softcap is not None:
    logits = jnp.tanh(logits / softcap) * softcap
  logits = jnp.where(mask[:, :, None, None, :], logits, K_MASK)
  probs = jax.nn.softmax(logits, axis=-1).astype(val.dtype)
  return jnp.einsum("BTKGS,BSKH->BTKGH", probs, val)


def blocked_attention(qg: jax.Array, key: jax.Array, val: jax.Array, mask: jax.Array,
                      softcap: float | None, block: int) -> jax.Array:
  """`attend` over query blocks of `block` rows (a `lax.scan` of a rematerialised body).

  Exact (each query row's softmax is over all S keys); peak memory holds one block's
  [B, block, K, G, S] scores instead of all T rows', and the backward pass recomputes each
  block's scores (memory-efficient attention in the sense of Rabe & Staats 2021, chunked over
  queries only). T need not be a multiple of `block` (padded rows are masked out and dropped).
  """
  b, t = qg.shape[:2]
  nb = -(-t // block)
  pad = nb * block - t
  if pad:
    qg = jnp.pad(qg, ((0, 0), (0, pad)) + ((0, 0),) * 3)
    mask = jnp.pad(mask, ((0, 0), (0, pad), (0, 0)))
  q_blocks = jnp.moveaxis(qg.reshape((b, nb, block) + qg.shape[2:]), 1, 0)
  m_blocks = jnp.moveaxis(mask.reshape(b, nb, block, mask.shape[-1]), 1, 0)

  @jax.checkpoint
  def body(carry, xs):
    q_b, m_b = xs
    return carry, attend(q_b, key, val, m_b, softcap)

  _, out = jax.lax.scan(body, None, (q_blocks, m_blocks))
  out = jnp.moveaxis(out, 0, 1).reshape((b, nb * block) + out.shape[3:])
  return out[:, :t]


def _block_spans(t: int, block: int, offset: int) -> list[tuple[int, int, int]]:
  """(first query row, end query row, key count) of each causal block of `block` rows."""
  return [(lo, min(lo + block, t), offset + min(lo + block, t)) for lo in range(0, t, block)]


def causal_blocked_attention(qg: jax.Array, key: jax.Array, val: jax.Array, mask: jax.Array,
                             softcap: float | None, block: int, remat_block: int = 0,
                             offset: int = 0) -> jax.Array:
  """`attend` for self-attention under a causal mask, skipping the keys no query can see.

  The queries are split into blocks of `block` slots; the block ending at slot e (exclusive)
  attends only to keys [0, e), because the mask is causal in slot order (`attention_mask`:
  key slot <= query slot) and every later key is masked for every query of the block. The
  result equals `attend(qg, key, val, mask, softcap)` at every query that may see a key (a
  padding row, which sees none, averages the values up to its block's end instead of all S;
  nothing reads it). The score and probability work
  falls from T·S to about T·S·(n + 1) / (2n) for n blocks (62.5% at n = 4, 56% at n = 8) -- the
  block-skipping idea of FlashAttention (Dao et al. 2022, arXiv:2205.14135, Sec. 3.1) at the
  granularity of XLA ops.

  With `remat_block` > 0 and T > `remat_block`, no block keeps its probabilities for the
  backward pass (`causal_flash_attention`: the output and each row's logsumexp are saved, and
  each block's probabilities are recomputed from them), so the [B, T, K, G, S] scores never
  exist whole; otherwise each block is an `attend`, which saves its probabilities.

  Args:
    qg: [B, T, K, G, H] queries of slots offset .. offset + T - 1.
    key, val: [B, S, K, H] keys and values of slots 0 .. S - 1 (S >= offset + T).
    mask: [B, T, S] bool, causal in slot order.
    block: query slots per causal block (> 0).
    remat_block: above this many query slots, recompute the probabilities in the backward
      pass (0: never).
    offset: slot index of the first query row.
  Returns:
    [B, T, K, G, H].
  """
  t = qg.shape[1]
  if remat_block and t > remat_block:
    return causal_flash_attention(qg, key, val, mask, softcap, block, offset)
  outs = [attend(qg[:, lo:hi], key[:, :s], val[:, :s], mask[:, lo:hi, :s], softcap)
          for lo, hi, s in _block_spans(t, block, offset)]
  return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def causal_flash_attention(qg: jax.Array, key: jax.Array, val: jax.Array, mask: jax.Array,
                           softcap: float | None, block: int, offset: int = 0) -> jax.Array:
  """`causal_blocked_attention` whose backward pass recomputes probabilities from logsumexps.

  The forward pass of each causal block computes its masked scores, m = rowmax, l = rowsum
  exp(s - m), the output (exp(s - m) @ V) / l, and saves only the output and
  lse = m + log l per query row. The backward pass recomputes each block's scores once,
  P = exp(s - lse) (no max or sum over keys), and forms dV = P^T dO, dP = dO V^T,
  dS = P * (dP - rowsum(dO * O)), dQ = dS K, dK = dS^T Q: FlashAttention-2's backward
  (Dao 2023, arXiv:2307.08691, Alg. 2) with whole causal blocks for tiles. Against
  rematerialising `attend` (`jax.checkpoint`), it skips recomputing P @ V and the two
  reductions of the softmax; against saving the probabilities, it holds O(T·H) residuals
  instead of O(T·S).

  Args and result as `causal_blocked_attention` (every block recomputed).
  """
  return _flash_fwd(qg, key, val, mask, softcap, block, offset)[0]


def _flash_fwd(qg, key, val, mask, softcap, block, offset):
  t, g = qg.shape[1], qg.shape[3]
  q, k, v = _to_kv_major(qg, key, val)
  outs, lses = [], []
  for lo, hi, s in _block_spans(t, block, offset):
    scores, _ = _masked_scores(q[:, :, lo * g:hi * g], k[:, :, :s], mask[:, lo:hi, :s], g,
                               softcap)
    m = jnp.max(scores, axis=-1, keepdims=True)
    e = jnp.exp(scores - m)
    l = jnp.sum(e, axis=-1, keepdims=True)
    o = jnp.einsum("BKMS,BKSH->BKMH", e.astype(v.dtype), v[:, :, :s],
                   preferred_element_type=jnp.float32) / l
    outs.append(o.astype(v.dtype))
    lses.append(m + jnp.log(l))  # [B, K, M, 1]
  out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)
  return _from_kv_major(out, t, g), (q, k, v, mask, out, lses)


def _flash_bwd(softcap, block, offset, res, d_out):
  q, k, v, mask, out, lses = res
  t, g = d_out.shape[1], d_out.shape[3]
  do = _q_to_kv_major(d_out)
  delta = _row_dot(do, out)
  d_k = jnp.zeros(k.shape, jnp.float32)
  d_v = jnp.zeros(v.shape, jnp.float32)
  d_qs = []
  for (lo, hi, s), lse in zip(_block_spans(t, block, offset), lses):
    rows = slice(lo * g, hi * g)
    q_b, k_b, v_b, do_b = q[:, :, rows], k[:, :, :s], v[:, :, :s], do[:, :, rows]
    scores, th = _masked_scores(q_b, k_b, mask[:, lo:hi, :s], g, softcap)
    p = jnp.exp(scores - lse)  # 0 at masked keys of any row that sees a key
    d_v_b = jnp.einsum("BKMS,BKMH->BKSH", p.astype(do.dtype), do_b,
                       preferred_element_type=jnp.float32)
    d_p = jnp.einsum("BKMH,BKSH->BKMS", do_b, v_b, preferred_element_type=jnp.float32)
    d_s = p * (d_p - delta[:, :, rows])
    if softcap is not None:
      d_s = d_s * (1.0 - th * th)
    d_s = jnp.where(_kv_major_mask(mask[:, lo:hi, :s], g), d_s, 0.0).astype(q.dtype)
    d_qs.append(contract("BKMS,BKSH->BKMH", d_s, k_b))
    d_k_b = jnp.einsum("BKMS,BKMH->BKSH", d_s, q_b, preferred_element_type=jnp.float32)
    d_k = jax.lax.dynamic_update_slice_in_dim(d_k, d_k[:, :, :s] + d_k_b, 0, axis=2)
    d_v = jax.lax.dynamic_update_slice_in_dim(d_v, d_v[:, :, :s] + d_v_b, 0, axis=2)
  d_q = d_qs[0] if len(d_qs) == 1 else jnp.concatenate(d_qs, axis=2)
  return (_from_kv_major(d_q, t, g), _swap_length_heads(d_k).astype(k.dtype),
          _swap_length_heads(d_v).astype(v.dtype), None)


causal_flash_attention.defvjp(_flash_fwd, _flash_bwd)
