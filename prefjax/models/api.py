"""Functional entry points over a plain params pytree (docs/internals.md, `prefjax.models`).

`params` is the content of the Linen `params` collection (no `{"params": ...}` wrapper).
Everything that applies the model takes `kernels: Kernels | None` (None: the defaults of
`jax.default_backend()`'s platform, `Kernels.for_platform`); the params never depend on it.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from prefjax import sharding
from prefjax.models.config import ModelConfig
from prefjax.models.kernels import Kernels, default_kernels
from prefjax.models.transformer import (ReadoutLayer, Transformer, attention_mask,
                                       positions_from_segments)

Params = dict[str, Any]


def _init_compiler_options() -> dict[str, Any] | None:
  """Init is compiled once and is dominated by per-parameter RNG code; on CPU, skipping LLVM's
  optimisation passes cuts its compile time 3-4x (values are the same for every mesh)."""
  return {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None


def _as_key(rng: Any) -> jax.Array:
  return jax.random.key(rng) if isinstance(rng, int) else rng


def _boxed_init(cfg: ModelConfig, rng: jax.Array) -> Params:
  """Linen init returning params still boxed in `nn.LogicallyPartitioned`."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  # Plain XLA kernels: the params do not depend on them, and no platform kernel is traced.
  return Transformer(cfg, Kernels()).init(rng, tokens, jnp.zeros_like(tokens), jnp.ones_like(tokens))["params"]


def logical_specs(cfg: ModelConfig) -> Any:
  """Pytree of logical `PartitionSpec`s (e.g. P('vocab', 'embed')) matching the params."""
  boxed = jax.eval_shape(lambda: _boxed_init(cfg, jax.random.key(0)))
  return nn.get_partition_spec(boxed)


def abstract_params(cfg: ModelConfig) -> Params:
  """Pytree of `jax.ShapeDtypeStruct`, same structure as the params (no allocation)."""
  return jax.eval_shape(lambda: nn.meta.unbox(_boxed_init(cfg, jax.random.key(0))))


def param_shardings(cfg: ModelConfig, mesh: Mesh,
                    rules: Any = None) -> Params:
  """Pytree of `NamedSharding` (same structure as params) from the logical-axis rules."""
  return sharding.logical_to_sharding(logical_specs(cfg), mesh,
                                      rules or sharding.LOGICAL_AXIS_RULES)


def init_params(cfg: ModelConfig, rng: Any, *, mesh: Mesh | None = None,
                rules: Any = None) -> Params:
  """Randomly initialised params; with `mesh`, created directly in their target shardings.

  eval_shape -> nn.get_partition_spec -> sharding.logical_to_sharding -> jit(out_shardings):
  no unsharded copy is ever materialised (big_vision / flax lm1b pattern).
  """
  rng = _as_key(rng)
  if mesh is None:
    return _jitted_init(cfg)(rng)
  rules = rules or sharding.LOGICAL_AXIS_RULES
  shardings = param_shardings(cfg, mesh, rules)
  init = lambda r: nn.meta.unbox(_boxed_init(cfg, r))  # noqa: E731
  with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
    return jax.jit(init, out_shardings=shardings, compiler_options=_init_compiler_options())(rng)


@functools.lru_cache(maxsize=16)
def _jitted_init(cfg: ModelConfig) -> Any:
  """Single-device init, compiled once per config."""
  return jax.jit(lambda r: nn.meta.unbox(_boxed_init(cfg, r)),
                 compiler_options=_init_compiler_options())


def _inputs(tokens: jax.Array, segment_ids: jax.Array | None, positions: jax.Array | None,
            branch_ids: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """Default segment ids (all 1) and positions (restart per segment / per prompt branch)."""
  tokens = jnp.asarray(tokens, jnp.int32)
  segment_ids = jnp.ones_like(tokens) if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
  if positions is not None:
    return segment_ids, jnp.asarray(positions, jnp.int32)
  if branch_ids is None:
    return segment_ids, positions_from_segments(segment_ids)
  # With branches a token's position = number of earlier tokens it attends to.
  idx = jnp.arange(tokens.shape[1], dtype=jnp.int32)
  m = attention_mask(idx, idx, segment_ids, segment_ids, q_branches=branch_ids,
                     k_branches=branch_ids)
  return segment_ids, jnp.maximum(m.sum(-1).astype(jnp.int32) - 1, 0)


def split_last_layer(cfg: ModelConfig, params: Params
                     ) -> tuple[ModelConfig, Params, Params] | None:
  """(config and params of the first num_layers - 1 layers, params of the last layer), or
  None when the last layer is inside a scanned repeat of a multi-layer attention pattern."""
  n = cfg.num_layers
  name = f"layer_{n - 1}"
  if name in params:  # unrolled (also the leftover layers after a scanned pattern)
    return cfg.replace(num_layers=n - 1), {k: v for k, v in params.items() if k != name}, \
        params[name]
  if "layers" in params and len(cfg.attention_pattern) == 1:
    trunk = dict(params, layers=jax.tree.map(lambda a: a[:-1], params["layers"]))
    return cfg.replace(num_layers=n - 1), trunk, jax.tree.map(lambda a: a[-1], params["layers"])
  return None


def forward_hidden(cfg: ModelConfig, params: Params, tokens: jax.Array, *,
                   segment_ids: jax.Array | None = None, positions: jax.Array | None = None,
                   branch_ids: jax.Array | None = None,
                   readout: jax.Array | None = None,
                   kernels: Kernels | None = None) -> jax.Array:
  """tokens [B, T] -> hidden states [B, T, D] after the final norm (cfg.dtype).

  Defaults: segment_ids all 1; positions restart at every segment (and, with `branch_ids`,
  count the shared prompt then the token's own branch).

  readout: optional [B, n] int slot indices; then returns [B, n, D], the hidden states at
    those slots only (what a reward model reads). The last layer is then computed only at
    those slots (its keys and values still from all T): exactly the gathered full forward,
    for about 1/num_layers less work. When the last layer sits inside a scanned multi-layer
    pattern the full forward is gathered instead.
  kernels: how attention is computed (None: `Kernels.for_platform(jax.default_backend())`).
  """
  kernels = default_kernels(kernels)
  segment_ids, positions = _inputs(tokens, segment_ids, positions, branch_ids)
  if branch_ids is not None:
    branch_ids = jnp.asarray(branch_ids, jnp.int32)
  tokens = jnp.asarray(tokens, jnp.int32)
  split = None if readout is None else split_last_layer(cfg, params)
  if split is None:
    hidden, _ = Transformer(cfg, kernels).apply({"params": params}, tokens, positions,
                                                segment_ids, branch_ids)
    if readout is None:
      return hidden
    return jnp.take_along_axis(hidden, jnp.asarray(readout, jnp.int32)[..., None], axis=1)
  trunk_cfg, trunk_params, last = split
  x, _ = Transformer(trunk_cfg, kernels).apply({"params": trunk_params}, tokens, positions,
                                               segment_ids, branch_ids, None, False)
  return ReadoutLayer(cfg, cfg.layer_types[-1], kernels).apply(
      {"params": {"last": last, "final_norm": params["final_norm"]}}, x, positions,
      segment_ids, branch_ids, jnp.asarray(readout, jnp.int32))


def unembedding(cfg: ModelConfig, params: Params) -> jax.Array:
  """Output projection [V, D]: the input embedding (tied) or `lm_head/w` (untied)."""
  if cfg.tie_embeddings:
    return params["embedder"]["input_embedding"]
  if "lm_head" not in params:
    raise ValueError("this untied model has no `lm_head` (reward models drop it)")
  return params["lm_head"]["w"]


def logits_from_hidden(cfg: ModelConfig, params: Params, hidden: jax.Array) -> jax.Array:
  """hidden [B, T, D] -> float32 logits [B, T, V], final soft-cap applied (Gemma 2)."""
  w = unembedding(cfg, params)
  logits = jnp.einsum("BTD,VD->BTV", hidden, jnp.asarray(w, hidden.dtype),
                      preferred_element_type=jnp.float32)
  if cfg.final_logit_softcap is not None:
    logits = jnp.tanh(logits / cfg.final_logit_softcap) * cfg.final_logit_softcap
  return nn.with_logical_constraint(logits, ("batch", "length", "activation_vocab"))


def forward(cfg: ModelConfig, params: Params, tokens: jax.Array, *,
            segment_ids: jax.Array | None = None, positions: jax.Array | None = None,
            branch_ids: jax.Array | None = None,
            kernels: Kernels | None = None) -> jax.Array:
  """tokens [B, T] int32 -> float32 logits [B, T, V] (materialises [B,T,V]: small vocab / eval).

  kernels: how attention is computed (None: `Kernels.for_platform(jax.default_backend())`).
  """
  hidden = forward_hidden(cfg, params, tokens, segment_ids=segment_ids, positions=positions,
                          branch_ids=branch_ids, kernels=kernels)
  return logits_from_hidden(cfg, params, hidden)


def reward_scores(cfg: ModelConfig, params: Params, hidden: jax.Array) -> jax.Array:
  """Reward head at every token: hidden [B, T, D] -> [B, T, num_reward_heads] float32."""
  if not cfg.num_reward_heads or "reward_head" not in params:
    raise ValueError("reward_scores needs cfg.num_reward_heads > 0 and params['reward_head']")
  head = params["reward_head"]
  return (jnp.einsum("BTD,DR->BTR", hidden.astype(jnp.float32), head["w"].astype(jnp.float32))
          + head["b"].astype(jnp.float32))


def reward_model_from_policy(cfg: ModelConfig, params: Params, rng: Any, *,
                             num_reward_heads: int = 1, mesh: Mesh | None = None,
                             rules: Any = None) -> tuple[ModelConfig, Params]:
  """Reward model from a policy: backbone copied (LM head dropped), fresh `reward_head`.

  The head is w ~ N(0, 1/D) [D, R], b = 0 [R]; with `mesh` it is placed in its sharding.
  """
  rcfg = cfg.replace(num_reward_heads=num_reward_heads)
  out = {k: v for k, v in params.items() if k not in ("lm_head", "reward_head")}
  d = cfg.embed_dim
  w = jax.random.normal(_as_key(rng), (d, num_reward_heads), rcfg.jnp_param_dtype) * d ** -0.5
  head = {"w": w, "b": jnp.zeros((num_reward_heads,), rcfg.jnp_param_dtype)}
  if mesh is not None:
    head = jax.device_put(head, param_shardings(rcfg, mesh, rules)["reward_head"])
  out["reward_head"] = head
  return rcfg, out


def count_params(tree: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _layer_slots(cfg: ModelConfig) -> tuple[int, int]:
  period = len(cfg.attention_pattern)
  return period, cfg.num_layers // period


def unstack_layers(cfg: ModelConfig, params: Params) -> Params:
  """Scanned params (`layers` stacked) -> per-layer `layer_{i}` params (checkpoint layout)."""
  if "layers" not in params:
    return params
  period, groups = _layer_slots(cfg)
  out = {k: v for k, v in params.items() if k != "layers"}
  for g in range(groups):
    for j in range(period):
      sub = params["layers"] if period == 1 else params["layers"][f"layer_{j}"]
      out[f"layer_{g * period + j}"] = jax.tree.map(lambda a, g=g: a[g], sub)
  return out


def stack_layers(cfg: ModelConfig, params: Params) -> Params:
  """Per-layer params -> the `scan_layers=True` layout (inverse of `unstack_layers`)."""
  if not cfg.scan_layers or "layers" in params:
    return params
  period, groups = _layer_slots(cfg)
  if not groups:
    return params
  used = {f"layer_{i}" for i in range(groups * period)}
  out = {k: v for k, v in params.items() if k not in used}
  stack = lambda j: jax.tree.map(  # noqa: E731
      lambda *xs: jnp.stack(xs), *[params[f"layer_{g * period + j}"] for g in range(groups)])
  out["layers"] = stack(0) if period == 1 else {f"layer_{j}": stack(j) for j in range(period)}
  return out
