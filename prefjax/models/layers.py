"""Transformer building blocks in Gemma-v1 style: small Linen modules, einsum strings as shape docs.

Parameter names and shapes follow the official Flax Gemma checkpoints
(google-deepmind/gemma `modules.py` / `layers.py`):

  attn/q_einsum/w          [N, D, H]      (GQA / MQA)
  attn/kv_einsum/w         [2, K, D, H]
  attn/qkv_einsum/w        [3, N, D, H]   (MHA, N == K)
  attn/attn_vec_einsum/w   [N, H, D]
  attn/_query_norm/scale   [H]            (Gemma 3 QK-norm)
  mlp/gating_einsum        [2, D, F]  or [2, F, D] when `transpose_gating_einsum`
  mlp/linear               [F, D]
  {pre_attention,post_attention,pre_ffw,post_ffw}_norm/scale  [D]

Shape letters: B batch, T query length, S key length, D model, N query heads, K kv heads,
G = N / K query heads per kv head, H head dim, F MLP width.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from prefjax.models.config import GLOBAL, LOCAL, ModelConfig, rope_inv_freq
from prefjax.models.gated_mlp import gated_mlp
from prefjax.models.mixed_einsum import contract, mixed_einsum

# Large negative logit for masked keys (Gemma's K_MASK); finite so fully-masked rows stay finite.
K_MASK = -2.3819763e38

LayerCache = dict[str, jax.Array]  # {"k": [B,S,K,H], "v": [B,S,K,H]}


def normal_init(stddev: float) -> nn.initializers.Initializer:
  return nn.initializers.normal(stddev=stddev)


def lp(init: Any, axes: tuple[str | None, ...]) -> Any:
  """Shorthand for `nn.with_logical_partitioning` (names from prefjax/sharding.py)."""
  return nn.with_logical_partitioning(init, axes)


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
  return nn.with_logical_constraint(x, axes)


class RMSNorm(nn.Module):
  """RMSNorm (Zhang & Sennrich 2019) in float32; output * (1 + scale) (Gemma) or * scale (Llama)."""

  plus_one: bool = True
  eps: float = 1e-6
  axis_name: str | None = "embed"
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = nn.initializers.zeros_init() if self.plus_one else nn.initializers.ones_init()
    scale = self.param("scale", lp(init, (self.axis_name,)), (x.shape[-1],), self.param_dtype)
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
    s = scale.astype(jnp.float32)
    return (normed * (1.0 + s if self.plus_one else s)).astype(x.dtype)


class Einsum(nn.Module):
  """A weight `w` of `shape` with logical `axes`, applied as `jnp.einsum(eqn, x, w)`.

  Summed in float32 when `dtype` is lower (`mixed_einsum`, gradients included)."""

  shape: tuple[int, ...]
  axes: tuple[str | None, ...]
  stddev: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, eqn: str, x: jax.Array) -> jax.Array:
    w = self.param("w", lp(normal_init(self.stddev), self.axes), self.shape, self.param_dtype)
    return mixed_einsum(eqn, x, jnp.asarray(w, self.dtype))


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: tuple[float, ...]) -> jax.Array:
  """Rotary embedding (Su et al. 2021), half-split layout of Gemma / HF `rotate_half`.

  Args:
    x: [B, T, N, H].
    positions: [B, T] int.
    inv_freq: H/2 inverse frequencies (already scaled for linear / llama3 RoPE scaling).
  Returns:
    [B, T, N, H] in x.dtype.
  """
  freq = jnp.asarray(inv_freq, jnp.float32)
  angles = positions.astype(jnp.float32)[..., None] * freq  # [B, T, H/2]
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def update_cache(cache: LayerCache, k: jax.Array, v: jax.Array,
                 index: jax.Array) -> LayerCache:
  """Writes k, v [B, T, K, H] into the cache at slot `index` (scalar int)."""
  start = (0, index, 0, 0)
  return {
      "k": jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start),
      "v": jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start),
  }


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


def take_rows(x: jax.Array, rows: jax.Array) -> jax.Array:
  """x [B, T, ...] at slot indices rows [B, n] -> [B, n, ...]."""
  return jnp.take_along_axis(x, rows.reshape(rows.shape + (1,) * (x.ndim - 2)), axis=1)


class Attention(nn.Module):
  """Multi-head / multi-query / grouped-query attention with Gemma 2/3 options."""

  cfg: ModelConfig
  layer_type: str = GLOBAL

  def _project(self, x: jax.Array, query_rows: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [B,T,D] -> q [B,T,N,H] (or [B,n,N,H] at `query_rows` [B,n]), k, v [B,T,K,H]."""
    c = self.cfg
    d, n, k, h = c.embed_dim, c.num_heads, c.num_kv_heads, c.head_dim
    kw = dict(stddev=d ** -0.5, dtype=c.jnp_dtype, param_dtype=c.jnp_param_dtype)
    if c.use_qkv_einsum:
      qkv = Einsum((3, n, d, h), ("qkv", "heads", "embed", "head_dim"), name="qkv_einsum", **kw)
      q, key, val = qkv("BTD,SNDH->SBTNH", x)
      if query_rows is not None:
        q = take_rows(q, query_rows)
    else:
      x_q = x if query_rows is None else take_rows(x, query_rows)
      q = Einsum((n, d, h), ("heads", "embed", "head_dim"), name="q_einsum", **kw)(
          "BTD,NDH->BTNH", x_q)
      kv = Einsum((2, k, d, h), ("kv", "kv_heads", "embed", "head_dim"), name="kv_einsum", **kw)
      key, val = kv("BSD,CKDH->CBSKH", x)
    if c.use_qk_norm:
      norm_kw = dict(plus_one=c.norm_scale_plus_one, eps=c.norm_eps, axis_name="head_dim",
                     param_dtype=c.jnp_param_dtype)
      q = RMSNorm(name="_query_norm", **norm_kw)(q)
      key = RMSNorm(name="_key_norm", **norm_kw)(key)
    return q, key, val

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array,
               cache: LayerCache | None = None, cache_index: jax.Array | None = None,
               query_rows: jax.Array | None = None) -> tuple[jax.Array, LayerCache | None]:
    """Attention over x [B,T,D] (or over the cache's S slots when `cache` is given).

    Args:
      x: [B, T, D] normalised inputs.
      positions: [B, T] RoPE positions.
      mask: [B, T, S] bool, True = attend (built by `transformer.attention_mask`).
      cache: optional {"k","v": [B, S, K, H]}; the new keys/values are written at `cache_index`.
      query_rows: optional [B, n] slot indices: only those queries are computed (keys and
        values still come from all T slots); the output is then [B, n, D].
    Returns:
      ([B, T, D] or [B, n, D], updated cache or None).
    """
    c = self.cfg
    q_pos = positions
    if query_rows is not None:
      if cache is not None:
        raise ValueError("query_rows and a KV cache cannot be combined")
      q_pos, mask = take_rows(positions, query_rows), take_rows(mask, query_rows)
    q, key, val = self._project(x, query_rows)
    inv_freq = rope_inv_freq(c, self.layer_type)
    q = apply_rope(q, q_pos, inv_freq) * jnp.asarray(c.query_scale, q.dtype)
    key = apply_rope(key, positions, inv_freq)
    q = constrain(q, ("batch", "length", "activation_heads", None))
    key = constrain(key, ("batch", "length", "activation_kv_heads", None))
    new_cache = None
    if cache is not None:
      new_cache = update_cache(cache, key, val, cache_index)
      key, val = new_cache["k"].astype(q.dtype), new_cache["v"].astype(q.dtype)
    b, t, n, h = q.shape
    g = n // c.num_kv_heads
    qg = q.reshape(b, t, c.num_kv_heads, g, h)
    block = c.attention_query_block
    if (cache is None and query_rows is None and c.attention_causal_block
        and key.shape[1] == t):
      encoded = causal_blocked_attention(qg, key, val, mask, c.attn_logit_softcap,
                                         c.attention_causal_block, block)
    elif cache is None and block and t > block:
      encoded = blocked_attention(qg, key, val, mask, c.attn_logit_softcap, block)
    else:
      encoded = attend(qg, key, val, mask, c.attn_logit_softcap)
    encoded = encoded.reshape(b, t, n, h)
    out = Einsum((n, h, c.embed_dim), ("heads", "head_dim", "embed"), stddev=(n * h) ** -0.5,
                 dtype=c.jnp_dtype, param_dtype=c.jnp_param_dtype, name="attn_vec_einsum")(
                     "BTNH,NHD->BTD", encoded)
    return out, new_cache


class FeedForward(nn.Module):
  """Gated MLP: GeGLU (Gemma; Shazeer 2020) or SwiGLU (Llama), params `gating_einsum`, `linear`."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B, T, D] -> [B, T, D]."""
    c = self.cfg
    d, f = c.embed_dim, c.hidden_dim
    pd = c.jnp_param_dtype
    if c.transpose_gating_einsum:
      w = self.param("gating_einsum", lp(normal_init(d ** -0.5), (None, "mlp", "embed")),
                     (2, f, d), pd)
    else:
      w = self.param("gating_einsum", lp(normal_init(d ** -0.5), (None, "embed", "mlp")),
                     (2, d, f), pd)
    w_out = self.param("linear", lp(normal_init(f ** -0.5), ("mlp", "embed")), (f, d), pd)
    return gated_mlp(x, jnp.asarray(w, c.jnp_dtype), jnp.asarray(w_out, c.jnp_dtype),
                     c.activation, bool(c.transpose_gating_einsum),
                     ("batch", "length", "activation_mlp"))


class Block(nn.Module):
  """Pre-norm residual block; Gemma 2/3 add post-attention and post-FFW norms."""

  cfg: ModelConfig
  layer_type: str = GLOBAL

  @nn.compact
  def __call__(self, x: jax.Array, ctx: dict[str, jax.Array],
               cache: LayerCache | None = None) -> tuple[jax.Array, LayerCache | None]:
    """x [B,T,D]; ctx holds `positions` [B,T], `mask_global`/`mask_local` [B,T,S], `cache_index`.

    With `ctx["readout"]` [B, n] (slot indices, no cache) only those slots' outputs are
    computed: keys and values come from all T slots, the queries, residual and MLP from the n
    slots, and the result is [B, n, D] (exact: a causal layer's output at a slot depends on the
    other slots only through their keys and values).
    """
    c = self.cfg
    norm = lambda name: RMSNorm(plus_one=c.norm_scale_plus_one, eps=c.norm_eps,  # noqa: E731
                                param_dtype=c.jnp_param_dtype, name=name)
    mask = ctx["mask_local"] if self.layer_type == LOCAL else ctx["mask_global"]
    readout = ctx.get("readout")
    h, cache = Attention(c, self.layer_type, name="attn")(
        norm("pre_attention_norm")(x), ctx["positions"], mask, cache, ctx.get("cache_index"),
        query_rows=readout)
    if c.use_post_attn_norm:
      h = norm("post_attention_norm")(h)
    if readout is not None:
      x = take_rows(x, readout)
    x = constrain(x + h, ("batch", "length", "activation_embed"))
    h = FeedForward(c, name="mlp")(norm("pre_ffw_norm")(x))
    if c.use_post_ffw_norm:
      h = norm("post_ffw_norm")(h)
    return constrain(x + h, ("batch", "length", "activation_embed")), cache


class BlockGroup(nn.Module):
  """One repeat of `cfg.attention_pattern` (the unit scanned when `scan_layers`).

  Used for patterns longer than one layer: params under `layers/layer_{j}/` (a one-layer
  pattern scans `Block` itself, params directly under `layers/`).
  """

  cfg: ModelConfig
  block_cls: Any = Block

  @nn.compact
  def __call__(self, x: jax.Array, ctx: dict[str, jax.Array],
               cache: Any = None) -> tuple[jax.Array, Any]:
    pattern = self.cfg.attention_pattern
    new = {}
    for j, t in enumerate(pattern):
      sub = None if cache is None else cache[f"layer_{j}"]
      x, new[f"layer_{j}"] = self.block_cls(self.cfg, t, name=f"layer_{j}")(x, ctx, sub)
    return x, (None if cache is None else new)
