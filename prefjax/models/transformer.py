"""The decoder (Linen `Transformer`) and the attention masks it is driven by.

Params (the Linen `params` collection) follow the official Flax Gemma checkpoint names:
`embedder/input_embedding` [V, D], `layer_{i}/...` (see layers.py), `final_norm/scale` [D], plus
`lm_head/w` [V, D] for untied language models (Llama, Mistral) and `reward_head/{w [D, R], b [R]}`
for reward models. With `scan_layers`, repeats of `attention_pattern` are stacked under `layers`
with a leading `layers` axis (one-layer pattern: `layers/attn/...`; longer pattern:
`layers/layer_{j}/...`); layers left over when `num_layers` is not a multiple of the pattern
length stay unrolled as `layer_{i}` with their global index (e.g. Gemma 3 1B: 4 scanned repeats of
6 layers, then `layer_24`, `layer_25`).
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from prefjax.models.config import LOCAL, ModelConfig
from prefjax.models.kernels import Kernels, default_kernels
from prefjax.models.layers import Block, BlockGroup, RMSNorm, constrain, lp, normal_init

Cache = dict[str, Any]


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
  """Positions [B, T] counting from 0 at the start of every segment (packed rows restart)."""
  t = segment_ids.shape[-1]
  idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids.shape)
  prev = jnp.concatenate([jnp.full_like(segment_ids[:, :1], -1), segment_ids[:, :-1]], axis=1)
  start = jax.lax.cummax(jnp.where(segment_ids != prev, idx, 0), axis=1)
  return idx - start


def attention_mask(q_index: jax.Array, k_index: jax.Array, q_segments: jax.Array,
                   k_segments: jax.Array, *, q_positions: jax.Array | None = None,
                   k_positions: jax.Array | None = None, window: int | None = None,
                   q_branches: jax.Array | None = None,
                   k_branches: jax.Array | None = None) -> jax.Array:
  """Boolean mask [B, T, S] (True = attend), docs/internals.md.

  causal (slot index k <= q) AND same segment AND key segment != 0 (padding) AND, when `window`,
  q_pos - k_pos < window (Beltagy et al. 2020; Gemma 2's local layers) AND, when branches are
  given, key branch == 0 (shared prompt) or key branch == query branch.

  Args:
    q_index: [B, T] or [T] slot index of each query; k_index: [S] slot index of each key.
    q_segments: [B, T]; k_segments: [B, S] (0 = padding).
    q_positions / k_positions: [B, T] / [B, S] positions, needed with `window`.
    q_branches / k_branches: [B, T] / [B, S] prompt-sharing branch ids (0 prompt, 1, 2, ...).
  """
  q_index = jnp.broadcast_to(q_index, q_segments.shape)
  mask = k_index[None, None, :] <= q_index[:, :, None]
  mask &= q_segments[:, :, None] == k_segments[:, None, :]
  mask &= (k_segments != 0)[:, None, :]
  if q_branches is not None:
    kb = k_branches[:, None, :]
    mask &= (kb == 0) | (kb == q_branches[:, :, None])
  if window is not None:
    mask &= (q_positions[:, :, None] - k_positions[:, None, :]) < window
  return mask


def layer_masks(cfg: ModelConfig, layer_types: Any, q_index: jax.Array, k_index: jax.Array,
                segment_ids: jax.Array, k_segments: jax.Array, **mask_args: Any
                ) -> dict[str, jax.Array]:
  """`mask_global` / `mask_local` (`attention_mask`) for the layer types that will run."""
  masks = {}
  if any(t != LOCAL for t in layer_types):
    masks["mask_global"] = attention_mask(q_index, k_index, segment_ids, k_segments,
                                          **mask_args)
  if LOCAL in layer_types:
    masks["mask_local"] = attention_mask(q_index, k_index, segment_ids, k_segments,
                                         window=cfg.sliding_window, **mask_args)
  return masks


def _remat(cls: Any, cfg: ModelConfig) -> Any:
  """Wraps a block in `nn.remat` for `cfg.remat` ('full' saves nothing, 'save_dots' matmuls)."""
  if cfg.remat == "none":
    return cls
  policy = None
  if cfg.remat == "save_dots":
    policy = jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims
  return nn.remat(cls, policy=policy, prevent_cse=not cfg.scan_layers)


class Embedder(nn.Module):
  """Token embedding `input_embedding` [V, D]; Gemma scales by sqrt(D) (Gemma report, §2)."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    """tokens [B, T] int -> [B, T, D] in cfg.dtype."""
    c = self.cfg
    table = self.param("input_embedding", lp(normal_init(c.embed_dim ** -0.5), ("vocab", "embed")),
                       (c.vocab_size, c.embed_dim), c.jnp_param_dtype)
    x = jnp.take(jnp.asarray(table, c.jnp_dtype), tokens, axis=0)
    if c.scale_embeddings:
      x = x * jnp.sqrt(jnp.float32(c.embed_dim)).astype(x.dtype)
    return x


class Transformer(nn.Module):
  """Gemma-family decoder returning final-norm hidden states [B, T, D] (and the updated cache).

  `kernels` (None: the default backend's `Kernels.for_platform`) reaches every layer's
  attention; it changes how attention is computed, never the parameters.
  """

  cfg: ModelConfig
  kernels: Kernels | None = None

  def _layers(self, x: jax.Array, ctx: dict[str, Any],
              cache: Cache | None) -> tuple[jax.Array, Cache]:
    c = self.cfg
    kern = default_kernels(self.kernels)
    block_cls = _remat(Block, c)
    new: Cache = {}
    start = 0
    period = len(c.attention_pattern)
    groups = c.num_layers // period if c.scan_layers else 0
    if groups:
      if period == 1:
        unit, args = block_cls, (c, c.attention_pattern[0], kern)
      else:
        unit, args = BlockGroup, (c, block_cls, kern)
      scanned = nn.scan(unit, variable_axes={"params": 0}, split_rngs={"params": True},
                        in_axes=(nn.broadcast, 0), length=groups,
                        metadata_params={nn.PARTITION_NAME: "layers"})
      x, new["layers"] = scanned(*args, name="layers")(
          x, ctx, None if cache is None else cache["layers"])
      start = groups * period
    types = c.layer_types
    for i in range(start, c.num_layers):
      name = f"layer_{i}"
      x, new[name] = block_cls(c, types[i], kern, name=name)(
          x, ctx, None if cache is None else cache[name])
    return x, new

  @nn.compact
  def __call__(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array,
               branch_ids: jax.Array | None = None,
               cache: Cache | None = None,
               final_norm: bool = True) -> tuple[jax.Array, Cache | None]:
    """Decoder forward.

    Args:
      tokens, positions, segment_ids: [B, T] int32 (segment 0 = padding).
      branch_ids: optional [B, T] prompt-sharing branches (no cache).
      cache: optional KV cache from `init_cache`; the T new tokens go to slots
        `cache["index"] ... + T` and attend over all S cache slots.
      final_norm: False returns the residual stream before `final_norm` (the trunk part of
        `api.forward_hidden(..., readout=...)`).
    Returns:
      (hidden [B, T, D] after `final_norm`, in cfg.dtype; updated cache or None).
    """
    c = self.cfg
    t = tokens.shape[1]
    if cache is None:
      q_index = k_index = jnp.arange(t, dtype=jnp.int32)
      k_pos, k_seg, k_br = positions, segment_ids, branch_ids
    else:
      if branch_ids is not None:
        raise ValueError("branch_ids are not supported together with a KV cache")
      idx = cache["index"]
      k_pos = jax.lax.dynamic_update_slice(cache["positions"], positions, (0, idx))
      k_seg = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids, (0, idx))
      k_br = None
      q_index = idx + jnp.arange(t, dtype=jnp.int32)
      k_index = jnp.arange(k_pos.shape[1], dtype=jnp.int32)
    mask_args = dict(q_branches=branch_ids, k_branches=k_br, q_positions=positions,
                     k_positions=k_pos)
    ctx = {"positions": positions, "segment_ids": segment_ids, "branch_ids": branch_ids,
           "cache_index": None if cache is None else cache["index"]}
    # Splash attention builds its masks from the ids itself: no [B, T, S] mask without a cache.
    if cache is not None or default_kernels(self.kernels).attention != "splash":
      ctx.update(layer_masks(c, c.attention_pattern, q_index, k_index, segment_ids, k_seg,
                             **mask_args))
    x = constrain(Embedder(c, name="embedder")(tokens), ("batch", "length", "activation_embed"))
    x, layer_cache = self._layers(x, ctx, None if cache is None else cache["layers_cache"])
    if not final_norm:
      return x, None
    x = RMSNorm(plus_one=c.norm_scale_plus_one, eps=c.norm_eps, param_dtype=c.jnp_param_dtype,
                name="final_norm")(x)
    if self.is_initializing():
      self._init_heads()
    if cache is None:
      return x, None
    return x, {"layers_cache": layer_cache, "positions": k_pos, "segment_ids": k_seg,
               "index": cache["index"] + t}

  def _init_heads(self) -> None:
    """Creates the output heads' params (they are applied functionally, see api.py)."""
    c = self.cfg
    std = c.embed_dim ** -0.5
    pd = c.jnp_param_dtype
    if c.has_lm_head:
      _Params((("w", lp(normal_init(std), ("vocab", "embed")), (c.vocab_size, c.embed_dim)),),
              pd, name="lm_head")()
    if c.num_reward_heads:
      r = c.num_reward_heads
      _Params((("w", lp(normal_init(std), ("embed", "reward_heads")), (c.embed_dim, r)),
               ("b", lp(nn.initializers.zeros_init(), ("reward_heads",)), (r,))),
              pd, name="reward_head")()


class ReadoutLayer(nn.Module):
  """The last decoder layer evaluated only at `readout` slots, then `final_norm`.

  Params: `last/...` (one layer, `Block` names) and `final_norm/scale`. Used by
  `api.forward_hidden(..., readout=...)` after `Transformer(..., final_norm=False)` has run the
  other layers, so a reward model reads its score positions without computing the last
  layer's queries, residual and MLP anywhere else.
  """

  cfg: ModelConfig
  layer_type: str
  kernels: Kernels | None = None

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array,
               branch_ids: jax.Array | None, readout: jax.Array) -> jax.Array:
    """x [B, T, D] (residual stream after the other layers), readout [B, n] -> [B, n, D]."""
    c = self.cfg
    idx = jnp.arange(x.shape[1], dtype=jnp.int32)
    ctx = {"positions": positions, "segment_ids": segment_ids, "branch_ids": branch_ids,
           "cache_index": None, "readout": readout,
           **layer_masks(c, (self.layer_type,), idx, idx, segment_ids, segment_ids,
                         q_branches=branch_ids, k_branches=branch_ids, q_positions=positions,
                         k_positions=positions)}
    x, _ = _remat(Block, c)(c, self.layer_type, self.kernels, name="last")(x, ctx, None)
    return RMSNorm(plus_one=c.norm_scale_plus_one, eps=c.norm_eps,
                   param_dtype=c.jnp_param_dtype, name="final_norm")(x)


class _Params(nn.Module):
  """Holds loose parameters `(name, init, shape)` (`lm_head/w`, `reward_head/{w,b}`)."""

  specs: tuple[tuple[str, Any, tuple[int, ...]], ...] = ()
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self) -> None:
    for name, init, shape in self.specs:
      self.param(name, init, shape, self.param_dtype)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _zeros_cache(cfg: ModelConfig, batch_size: int, length: int) -> Cache:
  """Builds an empty KV cache (see `init_cache`)."""
  kv = lambda *lead: {  # noqa: E731
      "k": jnp.zeros((*lead, batch_size, length, cfg.num_kv_heads, cfg.head_dim), cfg.jnp_dtype),
      "v": jnp.zeros((*lead, batch_size, length, cfg.num_kv_heads, cfg.head_dim), cfg.jnp_dtype)}
  layers: Cache = {}
  period = len(cfg.attention_pattern)
  groups = cfg.num_layers // period if cfg.scan_layers else 0
  if groups:
    layers["layers"] = kv(groups) if period == 1 else {
        f"layer_{j}": kv(groups) for j in range(period)}
  for i in range(groups * period, cfg.num_layers):
    layers[f"layer_{i}"] = kv()
  return {"layers_cache": layers,
          "positions": jnp.zeros((batch_size, length), jnp.int32),
          "segment_ids": jnp.zeros((batch_size, length), jnp.int32),
          "index": jnp.zeros((), jnp.int32)}


def init_cache(cfg: ModelConfig, batch_size: int, length: int) -> Cache:
  """Empty KV cache: per layer k, v [B, S, K, H] (cfg.dtype), slot positions / segments [B, S]
  (segment 0 = empty or padding) and the next write slot `index` (scalar int32)."""
  return _zeros_cache(cfg, batch_size, length)
