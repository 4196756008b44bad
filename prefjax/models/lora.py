"""LoRA adapters on the model's einsums (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large
Language Models", arXiv:2106.09685).

A targeted weight, viewed as a matrix W [in, out], is used as W + (alpha / r) * A @ B with
A [in, r] ~ N(0, 1/in) and B [r, out] = 0, so training starts from the base model. Only A and B
are trained; the base stays frozen and, in a preference run, is also the reference model: the
reference pass is the same forward on the base weights (no second copy).

  lcfg = lora.LoraConfig(rank=8, alpha=16.0, targets=("q", "k", "v", "o"))
  adapters = lora.init_adapters(cfg, base_params, lcfg, rng)   # same nesting as the params
  params = lora.merge(base_params, adapters, lcfg, cfg)        # W + s A B on the targets
  lora.save_peft_adapters(cfg, adapters, lcfg, "out_dir")       # PEFT adapter_model.safetensors
  adapters = lora.load_peft_adapters(cfg, base_params, lcfg, "out_dir")

Targets name the Hugging Face projections: q, k, v, o (attention) and gate, up, down (MLP).
Their matrix views of prefjax's einsum weights (leading stacked-layer axes are kept as batch
axes, so scanned and unscanned layouts work alike):

  q  attn/q_einsum/w [N, D, H] (or qkv_einsum/w[0])   in D        out (N, H)
  k  attn/kv_einsum/w[0] [K, D, H] (or qkv_einsum[1]) in D        out (K, H)
  v  attn/kv_einsum/w[1] (or qkv_einsum[2])           in D        out (K, H)
  o  attn/attn_vec_einsum/w [N, H, D]                 in (N, H)   out D
  gate, up  mlp/gating_einsum[0], [1] [D, F] (or [F, D] transposed)  in D  out F
  down  mlp/linear [F, D]                              in F        out D

In/out flatten in the order of the HF `Linear` rows and columns, so A.T and B.T are PEFT's
`lora_A.weight` [r, in] and `lora_B.weight` [out, r].
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from typing import Any, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

from prefjax.models import api
from prefjax.models.config import ModelConfig

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
_HF_NAMES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
             "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
             "down": "mlp.down_proj"}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """rank r, alpha (the update is scaled by alpha / r) and the targeted projections."""
  rank: int = 8
  alpha: float = 16.0
  targets: tuple[str, ...] = ("q", "k", "v", "o")

  def __post_init__(self):
    if int(self.rank) <= 0:
      raise ValueError(f"LoRA rank must be > 0, got {self.rank}")
    bad = [t for t in self.targets if t not in TARGETS]
    if bad or not self.targets:
      raise ValueError(f"unknown LoRA targets {bad or '()'}; choose from {TARGETS}")

  @property
  def scale(self) -> float:
    return float(self.alpha) / float(self.rank)


@dataclasses.dataclass(frozen=True)
class _View:
  """Where a target lives: param key under a layer, index into its leading stack axis (or None),
  the weight's ndim per layer, and the in / out axes of the selected slice."""
  key: tuple[str, ...]
  index: Optional[int]
  ndim: int
  in_axes: tuple[int, ...]
  out_axes: tuple[int, ...]


def _view(cfg: ModelConfig, target: str) -> _View:
  heads = ((1,), (0, 2))  # [N|K, D, H]: in D, out (N|K, H)
  if target in ("q", "k", "v"):
    if cfg.use_qkv_einsum:
      return _View(("attn", "qkv_einsum", "w"), "qkv".index(target), 4, *heads)
    if target == "q":
      return _View(("attn", "q_einsum", "w"), None, 3, *heads)
    return _View(("attn", "kv_einsum", "w"), "kv".index(target), 4, *heads)
  if target == "o":
    return _View(("attn", "attn_vec_einsum", "w"), None, 3, (0, 1), (2,))
  if target in ("gate", "up"):
    axes = ((1,), (0,)) if cfg.transpose_gating_einsum else ((0,), (1,))
    return _View(("mlp", "gating_einsum"), ("gate", "up").index(target), 3, *axes)
  return _View(("mlp", "linear"), None, 2, (0,), (1,))


def _layer_roots(params: dict) -> Iterator[tuple[tuple[str, ...], dict]]:
  """(path, subtree) of every decoder layer block (`layer_i`, or the scanned `layers`)."""
  for name, sub in params.items():
    if name.startswith("layer_"):
      yield (name,), sub
    elif name == "layers":
      if any(k.startswith("layer_") for k in sub):
        for j, s in sub.items():
          yield (name, j), s
      else:
        yield (name,), sub


def _get(tree: dict, path: tuple[str, ...]) -> Any:
  for k in path:
    tree = tree[k]
  return tree


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _slice_shape(w_shape: tuple[int, ...], v: _View) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(leading stacked-layer dims, the per-target slice's shape)."""
  lead = w_shape[:len(w_shape) - v.ndim]
  per_layer = w_shape[len(lead):]
  return lead, per_layer[1:] if v.index is not None else per_layer


def init_adapters(cfg: ModelConfig, params: dict, lcfg: LoraConfig, rng: Any,
                  dtype: Any = jnp.float32) -> dict:
  """A ~ N(0, 1/in), B = 0 for every targeted weight of every layer.

  Returns a tree `{<layer path>: {<param key path>: {target: {"a": [..., *in, r],
  "b": [..., r, *out]}}}}` nested like the params (float32 by default).
  """
  out: dict = {}
  key = jax.random.key(rng) if isinstance(rng, int) else rng
  for root, layer in _layer_roots(params):
    for t in lcfg.targets:
      v = _view(cfg, t)
      lead, sl = _slice_shape(tuple(_get(layer, v.key).shape), v)
      ins, outs = [sl[a] for a in v.in_axes], [sl[a] for a in v.out_axes]
      key, sub = jax.random.split(key)
      a = jax.random.normal(sub, (*lead, *ins, lcfg.rank), dtype) / math.sqrt(math.prod(ins))
      b = jnp.zeros((*lead, lcfg.rank, *outs), dtype)
      _set(out, (*root, *v.key, t), {"a": a, "b": b})
  return out


def delta(a: jax.Array, b: jax.Array, v: _View, scale: float) -> jax.Array:
  """scale * A @ B, laid out as the target's weight slice [..., *slice]."""
  n_in, n_out = len(v.in_axes), len(v.out_axes)
  lead = a.shape[:a.ndim - n_in - 1]
  ins, outs = a.shape[len(lead):-1], b.shape[len(lead) + 1:]
  m = jnp.matmul(a.reshape(*lead, math.prod(ins), a.shape[-1]),
                 b.reshape(*lead, b.shape[len(lead)], math.prod(outs)),
                 precision=jax.lax.Precision.HIGHEST)
  m = (scale * m).reshape(*lead, *ins, *outs)
  # Axes of m are (lead, in..., out...); put them back in the slice's order.
  order = [None] * (n_in + n_out)
  for i, ax in enumerate(v.in_axes):
    order[ax] = len(lead) + i
  for i, ax in enumerate(v.out_axes):
    order[ax] = len(lead) + n_in + i
  return jnp.transpose(m, (*range(len(lead)), *order))


def merge(params: dict, adapters: dict, lcfg: LoraConfig, cfg: ModelConfig) -> dict:
  """The params with every adapter's scale * A @ B added to its weight (in the weight's dtype).

  Pure and differentiable in `adapters`: the policy forward of a LoRA run.
  """
  out = dict(params)
  for root, _ in _layer_roots(adapters):
    layer = _get(params, root)
    new_layer = jax.tree.map(lambda x: x, layer)  # a fresh nesting to update
    for t in lcfg.targets:
      v = _view(cfg, t)
      ad = _get(adapters, (*root, *v.key, t))
      w = _get(new_layer, v.key)
      d = delta(ad["a"], ad["b"], v, lcfg.scale).astype(w.dtype)
      if v.index is None:
        w = w + d
      else:
        lead = w.ndim - v.ndim
        idx = (slice(None),) * lead + (v.index,)
        w = w.at[idx].add(d)
      _set(new_layer, v.key, w)
    if len(root) == 1:
      out[root[0]] = new_layer
    else:
      out[root[0]] = {**out[root[0]], root[1]: new_layer}
  return out


def config_from(spec: Any) -> Optional[LoraConfig]:
  """`model.lora` keys (a mapping: rank, alpha, targets as "q,v" or a sequence) as a LoraConfig;
  None when the rank is 0 or unset (full fine-tuning). alpha defaults to 2 * rank."""
  spec = spec or {}
  rank = int(spec.get("rank") or 0)
  if not rank:
    return None
  targets = spec.get("targets") or "q,k,v,o"
  if isinstance(targets, str):
    targets = [t.strip() for t in targets.split(",") if t.strip()]
  return LoraConfig(rank, float(spec.get("alpha") or 2 * rank), tuple(targets))


def also_trained(cfg: ModelConfig) -> tuple[str, ...]:
  """Top-level params trained in full beside the adapters: a reward model's head."""
  return ("reward_head",) if cfg.num_reward_heads else ()


def abstract_trainable(cfg: ModelConfig, abstract_params: dict, lcfg: LoraConfig,
                       adapter_sharding: Any) -> dict:
  """`ShapeDtypeStruct`s of `trainable_from(...)` with shardings: the adapters on
  `adapter_sharding`, the fully trained entries as `abstract_params` has them."""
  adapters = jax.eval_shape(lambda: init_adapters(cfg, abstract_params, lcfg,
                                                  jax.random.key(0)))
  adapters = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                         sharding=adapter_sharding), adapters)
  return trainable_from(abstract_params, adapters, also_trained(cfg))


def trainable_from(params: dict, adapters: dict, also_train: tuple[str, ...] = ()) -> dict:
  """The trainable tree of a LoRA run: `{"lora": adapters, <key>: params[key] for also_train}`
  (e.g. a new reward model's `reward_head`, trained in full beside the adapters)."""
  return {"lora": adapters, **{k: params[k] for k in also_train if k in params}}


def apply(base: dict, trainable: dict, lcfg: LoraConfig, cfg: ModelConfig) -> dict:
  """The policy params of a LoRA run: `base` with the adapters merged and the fully trained
  top-level entries of `trainable` (see `trainable_from`) in place of the base's."""
  out = merge(base, trainable["lora"], lcfg, cfg)
  out.update({k: v for k, v in trainable.items() if k != "lora"})
  return out


def count(adapters: dict) -> int:
  return api.count_params(adapters)


# ------------------------------------------------------------------ PEFT interop


def _peft_entries(cfg: ModelConfig, adapters: dict,
                  lcfg: LoraConfig) -> Iterator[tuple[str, np.ndarray]]:
  flat = api.unstack_layers(cfg, adapters) if "layers" in adapters else adapters
  for i in range(cfg.num_layers):
    layer = flat[f"layer_{i}"]
    for t in lcfg.targets:
      v = _view(cfg, t)
      ad = _get(layer, (*v.key, t))
      a = np.asarray(jax.device_get(ad["a"]), np.float32)
      b = np.asarray(jax.device_get(ad["b"]), np.float32)
      name = f"base_model.model.model.layers.{i}.{_HF_NAMES[t]}"
      yield f"{name}.lora_A.weight", a.reshape(-1, lcfg.rank).T.copy()
      yield f"{name}.lora_B.weight", b.reshape(lcfg.rank, -1).T.copy()


def save_peft_adapters(cfg: ModelConfig, adapters: dict, lcfg: LoraConfig,
                       path: str | os.PathLike, base_model_name_or_path: str = "") -> None:
  """Writes `adapter_model.safetensors` + `adapter_config.json` as Hugging Face PEFT reads them."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  save_file(dict(_peft_entries(cfg, adapters, lcfg)), str(path / "adapter_model.safetensors"))
  config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(lcfg.rank),
            "lora_alpha": float(lcfg.alpha), "lora_dropout": 0.0, "bias": "none",
            "target_modules": sorted(_HF_NAMES[t].split(".")[1] for t in lcfg.targets),
            "base_model_name_or_path": base_model_name_or_path, "fan_in_fan_out": False,
            "inference_mode": True}
  (path / "adapter_config.json").write_text(json.dumps(config, indent=2))


def load_peft_adapters(cfg: ModelConfig, params: dict, path: str | os.PathLike) -> tuple[
    LoraConfig, dict]:
  """Reads a PEFT LoRA folder written by `save_peft_adapters` (or PEFT for the same model)
  -> (LoraConfig, adapters in the layout of `params`)."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path)
  conf = json.loads((path / "adapter_config.json").read_text())
  by_module = {v.split(".")[1]: k for k, v in _HF_NAMES.items()}
  targets = tuple(t for t in TARGETS if _HF_NAMES[t].split(".")[1] in conf["target_modules"])
  missing = sorted(set(conf["target_modules"]) - set(by_module))
  if missing:
    raise ValueError(f"{path}: LoRA target modules {missing} have no prefjax equivalent")
  lcfg = LoraConfig(rank=int(conf["r"]), alpha=float(conf["lora_alpha"]), targets=targets)
  tensors = load_file(str(path / "adapter_model.safetensors"))
  flat_params = api.unstack_layers(cfg, params)
  flat: dict = {}
  for i in range(cfg.num_layers):
    for t in targets:
      v = _view(cfg, t)
      _, sl = _slice_shape(tuple(_get(flat_params[f"layer_{i}"], v.key).shape), v)
      ins, outs = [sl[a] for a in v.in_axes], [sl[a] for a in v.out_axes]
      name = f"base_model.model.model.layers.{i}.{_HF_NAMES[t]}"
      a = tensors[f"{name}.lora_A.weight"].T.reshape(*ins, lcfg.rank)
      b = tensors[f"{name}.lora_B.weight"].T.reshape(lcfg.rank, *outs)
      _set(flat, (f"layer_{i}", *v.key, t), {"a": jnp.asarray(a), "b": jnp.asarray(b)})
  if "layers" in params:
    flat = api.stack_layers(cfg, flat)
  return lcfg, flat
