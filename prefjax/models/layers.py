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

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from prefjax.models.attention_kernels import (  # noqa: F401  (re-exported)
    K_MASK, attend, attend_reference, blocked_attention, causal_blocked_attention,
    causal_flash_attention)
from prefjax.models.config import GLOBAL, LOCAL, ModelConfig, rope_inv_freq
from prefjax.models.gated_mlp import gated_mlp
from prefjax.models.kernels import Kernels, default_kernels
from prefjax.models.mixed_einsum import mixed_einsum
from prefjax.models.window_attention import window_flash_attention

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




def take_rows(x: jax.Array, rows: jax.Array) -> jax.Array:
  """x [B, T, ...] at slot indices rows [B, n] -> [B, n, ...]."""
  return jnp.take_along_axis(x, rows.reshape(rows.shape + (1,) * (x.ndim - 2)), axis=1)


# Key windows chosen row by row unroll one switch per row and causal block; above this many
# rows (or with the batch split over devices) one window per block serves all rows.
MAX_WINDOW_ROWS = 8


def batch_is_split() -> bool:
  """Whether the current mesh (`jax.set_mesh`) splits the `batch` logical axis over devices."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return False
  spec = nn.logical_to_mesh_axes(("batch",))[0]
  axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
  sizes = dict(mesh.shape)
  n = 1
  for a in axes:
    n *= sizes.get(a, 1)
  return n > 1


class Attention(nn.Module):
  """Multi-head / multi-query / grouped-query attention with Gemma 2/3 options.

  `kernels` (None: the default backend's `Kernels.for_platform`) picks how the scores are
  computed (`__call__`); the parameters are the same for every choice.
  """

  cfg: ModelConfig
  layer_type: str = GLOBAL
  kernels: Kernels | None = None

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
  def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array | None,
               cache: LayerCache | None = None, cache_index: jax.Array | None = None,
               query_rows: jax.Array | None = None, *, segment_ids: jax.Array | None = None,
               branch_ids: jax.Array | None = None) -> tuple[jax.Array, LayerCache | None]:
    """Attention over x [B,T,D] (or over the cache's S slots when `cache` is given).

    Kernels (`self.kernels`): with `attention="splash"`, self-attention without a cache and
    without `query_rows` runs `splash_attention.splash_attention` from `segment_ids`,
    `positions` and `branch_ids` (no mask). Everything else takes the XLA paths: causal blocks
    with per-row key windows (`attention_key_tile`, window_attention.py), causal blocks
    (`attention_causal_block`), rematerialised query blocks (`attention_query_block`), or
    plain `attend` over the mask.

    Args:
      x: [B, T, D] normalised inputs.
      positions: [B, T] RoPE positions.
      mask: [B, T, S] bool, True = attend (built by `transformer.attention_mask`); may be None
        only for the splash path.
      cache: optional {"k","v": [B, S, K, H]}; the new keys/values are written at `cache_index`.
      query_rows: optional [B, n] slot indices: only those queries are computed (keys and
        values still come from all T slots); the output is then [B, n, D].
      segment_ids, branch_ids: [B, T] int32 (segment 0 = padding; branches optional), read
        by the splash path only.
    Returns:
      ([B, T, D] or [B, n, D], updated cache or None).
    """
    c = self.cfg
    kern = default_kernels(self.kernels)
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
    self_attention = cache is None and query_rows is None and key.shape[1] == t
    block = kern.attention_query_block
    causal = self_attention and kern.attention_causal_block
    if self_attention and kern.attention == "splash":
      if segment_ids is None:
        raise ValueError("splash attention needs segment_ids (the layer context's)")
      # Imported here: the Pallas TPU kernel is only traced when chosen.
      from prefjax.models import splash_attention  # pylint: disable=import-outside-toplevel
      encoded = splash_attention.splash_attention(
          qg, key, val, segment_ids=segment_ids, positions=positions, branch_ids=branch_ids,
          window=c.sliding_window if self.layer_type == LOCAL else None,
          softcap=c.attn_logit_softcap)
    elif causal and kern.attention_key_tile and block and t > block:
      per_row = b <= MAX_WINDOW_ROWS and not batch_is_split()
      encoded = window_flash_attention(qg, key, val, mask, c.attn_logit_softcap,
                                       kern.attention_causal_block, kern.attention_key_tile, 0,
                                       per_row)
    elif causal:
      encoded = causal_blocked_attention(qg, key, val, mask, c.attn_logit_softcap,
                                         kern.attention_causal_block, block)
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
  kernels: Kernels | None = None

  @nn.compact
  def __call__(self, x: jax.Array, ctx: dict[str, jax.Array],
               cache: LayerCache | None = None) -> tuple[jax.Array, LayerCache | None]:
    """x [B,T,D]; ctx holds `positions`, `segment_ids`, `branch_ids` (or None) [B,T],
    `mask_global`/`mask_local` [B,T,S] (absent when no attention call needs them) and
    `cache_index`.

    With `ctx["readout"]` [B, n] (slot indices, no cache) only those slots' outputs are
    computed: keys and values come from all T slots, the queries, residual and MLP from the n
    slots, and the result is [B, n, D] (exact: a causal layer's output at a slot depends on the
    other slots only through their keys and values).
    """
    c = self.cfg
    norm = lambda name: RMSNorm(plus_one=c.norm_scale_plus_one, eps=c.norm_eps,  # noqa: E731
                                param_dtype=c.jnp_param_dtype, name=name)
    mask = ctx.get("mask_local" if self.layer_type == LOCAL else "mask_global")
    readout = ctx.get("readout")
    h, cache = Attention(c, self.layer_type, self.kernels, name="attn")(
        norm("pre_attention_norm")(x), ctx["positions"], mask, cache, ctx.get("cache_index"),
        query_rows=readout, segment_ids=ctx.get("segment_ids"),
        branch_ids=ctx.get("branch_ids"))
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
  kernels: Kernels | None = None

  @nn.compact
  def __call__(self, x: jax.Array, ctx: dict[str, jax.Array],
               cache: Any = None) -> tuple[jax.Array, Any]:
    pattern = self.cfg.attention_pattern
    new = {}
    for j, t in enumerate(pattern):
      sub = None if cache is None else cache[f"layer_{j}"]
      x, new[f"layer_{j}"] = self.block_cls(self.cfg, t, self.kernels, name=f"layer_{j}")(
          x, ctx, sub)
    return x, (None if cache is None else new)
