"""Hugging Face checkpoint import / export (Gemma, Gemma 2, Gemma 3 text, Llama, Mistral and their
`*ForSequenceClassification` reward models).

Layout conversion (HF torch `Linear.weight` is [out, in]):
  q_proj [N*H, D]      -> attn/q_einsum/w [N, D, H]          k_proj, v_proj -> kv_einsum [2, K, D, H]
  (N == K)             -> attn/qkv_einsum/w [3, N, D, H]     o_proj [D, N*H] -> attn_vec_einsum [N, H, D]
  gate_proj, up_proj [F, D] -> mlp/gating_einsum [2, D, F] (or [2, F, D] transposed)
  down_proj [D, F]     -> mlp/linear [F, D]                  score [R, D] -> reward_head/w [D, R]
RMSNorm weights are copied as they are: HF Gemma also computes x * (1 + w), HF Llama x * w, and the
config's `norm_scale_plus_one` records which.
"""
from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from prefjax.models import api
from prefjax.models.config import GLOBAL, LOCAL, ModelConfig
from prefjax.models.safetensors_io import CheckpointReader, write_sharded

_MODEL_TYPES = {"gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3", "llama": "llama",
                "mistral": "mistral"}
_ARCH_PREFIX = {"gemma": "Gemma", "gemma2": "Gemma2", "gemma3": "Gemma3", "llama": "Llama",
                "mistral": "Mistral"}
_LAYER_TYPES = {"sliding_attention": LOCAL, "full_attention": GLOBAL}

# One conversion entry: (prefjax path, HF tensor names, HF arrays -> prefjax, prefjax -> HF arrays).
Entry = tuple[tuple[str, ...], tuple[str, ...], Callable[..., np.ndarray],
              Callable[[np.ndarray], tuple[np.ndarray, ...]]]


def _period(types: list[str]) -> tuple[str, ...]:
  """Shortest repeating pattern of the per-layer attention types."""
  for p in range(1, len(types) + 1):
    if all(types[i] == types[i % p] for i in range(len(types))):
      return tuple(types[:p])
  return tuple(types)


def _rope_fields(rope: dict[str, Any] | None, theta: float) -> dict[str, Any]:
  """HF rope dict ({"rope_type", "factor", ...}) -> ModelConfig rope fields."""
  rope = dict(rope or {})
  kind = rope.get("rope_type", rope.get("type", "default"))
  out: dict[str, Any] = {"rope_base": float(rope.get("rope_theta", theta))}
  if kind == "default":
    return out
  if kind == "linear":
    return {**out, "rope_scaling": "linear", "rope_factor": float(rope["factor"])}
  if kind == "llama3":
    return {**out, "rope_scaling": "llama3", "rope_factor": float(rope["factor"]),
            "rope_low_freq_factor": float(rope["low_freq_factor"]),
            "rope_high_freq_factor": float(rope["high_freq_factor"]),
            "rope_original_max_positions": int(rope["original_max_position_embeddings"])}
  raise ValueError(f"unsupported RoPE scaling {rope!r} (supported: default, linear, llama3)")


def _rope_from_hf(hf: dict[str, Any], family: str) -> dict[str, Any]:
  params = hf.get("rope_parameters")
  if family != "gemma3":
    return _rope_fields(params or hf.get("rope_scaling"), hf.get("rope_theta", 10_000.0))
  if params and "full_attention" in params:
    glob, loc = params["full_attention"], params.get("sliding_attention") or {}
  else:
    glob, loc = (params or hf.get("rope_scaling") or {}), {}
  out = _rope_fields(glob, hf.get("rope_theta", 1_000_000.0))
  local = _rope_fields(loc, hf.get("rope_local_base_freq", 10_000.0))
  if local.get("rope_scaling", "none") != "none":
    raise ValueError("scaled RoPE on Gemma 3 sliding layers is not supported")
  return {**out, "rope_local_base": local["rope_base"]}


def _num_labels(hf: dict[str, Any]) -> int:
  return int(hf.get("num_labels") or len(hf.get("id2label") or {}) or 2)


def config_from_hf(hf: dict[str, Any], **overrides: Any) -> ModelConfig:
  """transformers config.json dict -> ModelConfig (raises ValueError when unsupported)."""
  model_type = hf.get("model_type")
  arch = (hf.get("architectures") or ["?"])[0]
  if model_type not in _MODEL_TYPES or not arch.endswith(("ForCausalLM", "ForSequenceClassification")):
    raise ValueError(f"unsupported architecture {arch!r} (model_type={model_type!r}); supported: "
                     f"{sorted(_MODEL_TYPES)} as *ForCausalLM / *ForSequenceClassification")
  family = _MODEL_TYPES[model_type]
  gemma = family.startswith("gemma")
  heads = hf["num_attention_heads"]
  n_layers = hf["num_hidden_layers"]
  window = hf.get("sliding_window")
  if family in ("gemma2", "gemma3"):
    types = [_LAYER_TYPES[t] for t in hf.get("layer_types") or []] or (
        [LOCAL if (i + 1) % 2 else GLOBAL for i in range(n_layers)] if family == "gemma2" else
        [LOCAL if (i + 1) % hf.get("sliding_window_pattern", 6) else GLOBAL
         for i in range(n_layers)])
    pattern = _period(types)
  else:
    pattern = (LOCAL,) if (family == "mistral" and window) else (GLOBAL,)
  act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
  if act not in ("gelu", "gelu_pytorch_tanh", "silu"):
    raise ValueError(f"unsupported activation {act!r}")
  kw: dict[str, Any] = dict(
      family=family, vocab_size=hf["vocab_size"], embed_dim=hf["hidden_size"],
      num_layers=n_layers, num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
      hidden_dim=hf["intermediate_size"], activation="silu" if act == "silu" else "gelu",
      tie_embeddings=bool(hf.get("tie_word_embeddings", gemma)), scale_embeddings=gemma,
      norm_scale_plus_one=gemma, norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      use_post_attn_norm=family in ("gemma2", "gemma3"),
      use_post_ffw_norm=family in ("gemma2", "gemma3"), use_qk_norm=family == "gemma3",
      transpose_gating_einsum=family == "gemma3", attention_pattern=pattern,
      sliding_window=window if LOCAL in pattern else None,
      query_pre_attn_scalar=hf.get("query_pre_attn_scalar"),
      attn_logit_softcap=hf.get("attn_logit_softcapping"),
      final_logit_softcap=hf.get("final_logit_softcapping"),
      max_position_embeddings=int(hf.get("max_position_embeddings", 8192)),
      num_reward_heads=_num_labels(hf) if arch.endswith("ForSequenceClassification") else 0,
      bos_token_id=_first(hf.get("bos_token_id"), 2), eos_token_id=_first(hf.get("eos_token_id"), 1),
      pad_token_id=_first(hf.get("pad_token_id"), 0), **_rope_from_hf(hf, family))
  kw.update(overrides)
  return ModelConfig(**kw)


def _first(x: Any, default: int) -> int:
  if isinstance(x, list):
    x = x[0] if x else None
  return default if x is None else int(x)


def _rope_to_hf(cfg: ModelConfig, local: bool = False) -> dict[str, Any]:
  if local and cfg.rope_local_base is not None:
    return {"rope_type": "default", "rope_theta": cfg.rope_local_base}
  out: dict[str, Any] = {"rope_type": "default" if cfg.rope_scaling == "none" else cfg.rope_scaling,
                         "rope_theta": cfg.rope_base}
  if cfg.rope_scaling != "none":
    out["factor"] = cfg.rope_factor
  if cfg.rope_scaling == "llama3":
    out.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
               original_max_position_embeddings=cfg.rope_original_max_positions)
  return out


def _check_exportable(cfg: ModelConfig) -> None:
  fam = cfg.family
  gemma = fam.startswith("gemma")
  problems = []
  if cfg.norm_scale_plus_one != gemma or cfg.scale_embeddings != gemma:
    problems.append("norm / embedding-scale convention differs from the family's")
  if (cfg.use_post_attn_norm or cfg.use_post_ffw_norm) != (fam in ("gemma2", "gemma3")):
    problems.append("post-norms do not match the family")
  if cfg.use_qk_norm != (fam == "gemma3") or cfg.transpose_gating_einsum and fam == "gemma":
    problems.append("QK-norm / gating layout does not match the family")
  if LOCAL in cfg.attention_pattern and fam in ("gemma", "llama"):
    problems.append(f"{fam} has no sliding-window layers in transformers")
  if fam == "mistral" and cfg.attention_pattern not in ((LOCAL,), (GLOBAL,)):
    problems.append("mistral layers must all be local or all global")
  if problems:
    raise ValueError(f"config cannot be exported as HF {fam}: {'; '.join(problems)}")


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  """ModelConfig -> transformers config.json dict (transformers >= 5 `rope_parameters` format)."""
  _check_exportable(cfg)
  fam = cfg.family
  head = "ForSequenceClassification" if cfg.num_reward_heads else "ForCausalLM"
  hf: dict[str, Any] = dict(
      architectures=[_ARCH_PREFIX[fam] + head],
      model_type="gemma3_text" if fam == "gemma3" else fam,
      vocab_size=cfg.vocab_size, hidden_size=cfg.embed_dim, intermediate_size=cfg.hidden_dim,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps,
      max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_embeddings,
      bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
      attention_bias=False, attention_dropout=0.0, dtype=cfg.param_dtype, use_cache=True)
  act = "silu" if cfg.activation == "silu" else "gelu_pytorch_tanh"
  hf["hidden_activation" if fam in ("gemma2", "gemma3") else "hidden_act"] = act
  if fam in ("llama", "mistral"):
    hf["mlp_bias"] = False
  if fam in ("gemma2", "gemma3"):
    scalar = cfg.query_pre_attn_scalar or cfg.head_dim
    hf.update(query_pre_attn_scalar=int(scalar) if float(scalar).is_integer() else scalar,
              attn_logit_softcapping=cfg.attn_logit_softcap,
              final_logit_softcapping=cfg.final_logit_softcap,
              sliding_window=cfg.sliding_window or cfg.max_position_embeddings,
              layer_types=["sliding_attention" if t == LOCAL else "full_attention"
                           for t in cfg.layer_types])
  if fam == "gemma3":
    hf["rope_parameters"] = {"full_attention": _rope_to_hf(cfg),
                             "sliding_attention": _rope_to_hf(cfg, local=True)}
  else:
    hf["rope_parameters"] = _rope_to_hf(cfg)
  if fam == "mistral":
    hf["sliding_window"] = cfg.sliding_window if LOCAL in cfg.attention_pattern else None
  if cfg.num_reward_heads:
    hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.num_reward_heads)}
    hf["label2id"] = {f"LABEL_{i}": i for i in range(cfg.num_reward_heads)}
  return hf


def _layer_entries(cfg: ModelConfig, i: int) -> list[Entry]:
  """Conversion entries of decoder layer i."""
  n, k, h, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.embed_dim
  p, L = f"model.layers.{i}.", f"layer_{i}"
  heads_in = lambda m: lambda w: w.reshape(m, h, d).transpose(0, 2, 1)  # noqa: E731
  heads_out = lambda x: x.transpose(0, 2, 1).reshape(-1, d)  # noqa: E731
  a = p + "self_attn."
  if cfg.use_qkv_einsum:
    out = [((L, "attn", "qkv_einsum", "w"), (a + "q_proj.weight", a + "k_proj.weight",
             a + "v_proj.weight"), lambda q, kk, v: np.stack([heads_in(n)(x) for x in (q, kk, v)]),
            lambda x: tuple(heads_out(y) for y in x))]
  else:
    out = [((L, "attn", "q_einsum", "w"), (a + "q_proj.weight",), heads_in(n),
            lambda x: (heads_out(x),)),
           ((L, "attn", "kv_einsum", "w"), (a + "k_proj.weight", a + "v_proj.weight"),
            lambda kk, v: np.stack([heads_in(k)(kk), heads_in(k)(v)]),
            lambda x: (heads_out(x[0]), heads_out(x[1])))]
  out.append(((L, "attn", "attn_vec_einsum", "w"), (a + "o_proj.weight",),
              lambda w: w.T.reshape(n, h, d), lambda x: (x.reshape(n * h, d).T,)))
  m = p + "mlp."
  if cfg.transpose_gating_einsum:
    gate = (lambda g, u: np.stack([g, u]), lambda x: (x[0], x[1]))
  else:
    gate = (lambda g, u: np.stack([g.T, u.T]), lambda x: (x[0].T, x[1].T))
  out.append(((L, "mlp", "gating_einsum"), (m + "gate_proj.weight", m + "up_proj.weight"), *gate))
  out.append(((L, "mlp", "linear"), (m + "down_proj.weight",), lambda w: w.T, lambda x: (x.T,)))
  same = (lambda w: w, lambda x: (x,))
  norms = {"pre_attention_norm": "input_layernorm"}
  if cfg.family in ("gemma2", "gemma3"):
    norms.update(post_attention_norm="post_attention_layernorm",
                 pre_ffw_norm="pre_feedforward_layernorm",
                 post_ffw_norm="post_feedforward_layernorm")
  else:
    norms["pre_ffw_norm"] = "post_attention_layernorm"
  out += [((L, ours, "scale"), (p + theirs + ".weight",), *same) for ours, theirs in norms.items()]
  if cfg.use_qk_norm:
    out += [((L, "attn", "_query_norm", "scale"), (a + "q_norm.weight",), *same),
            ((L, "attn", "_key_norm", "scale"), (a + "k_norm.weight",), *same)]
  return out


def conversion_entries(cfg: ModelConfig) -> list[Entry]:
  """All (prefjax path, HF names, to_prefjax, to_hf) entries for an unscanned config."""
  same = (lambda w: w, lambda x: (x,))
  out: list[Entry] = [(("embedder", "input_embedding"), ("model.embed_tokens.weight",), *same)]
  for i in range(cfg.num_layers):
    out += _layer_entries(cfg, i)
  out.append((("final_norm", "scale"), ("model.norm.weight",), *same))
  if cfg.has_lm_head:
    out.append((("lm_head", "w"), ("lm_head.weight",), *same))
  if cfg.num_reward_heads:
    out.append((("reward_head", "w"), ("score.weight",), lambda w: w.T, lambda x: (x.T,)))
  return out


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def load_hf_checkpoint(path: str | os.PathLike, *, mesh: Mesh | None = None, rules: Any = None,
                       **config_overrides: Any) -> tuple[ModelConfig, api.Params]:
  """Loads a local HF checkpoint dir (config.json + safetensors shards) -> (cfg, params).

  Tensors are read one at a time, converted to cfg.param_dtype (float32 by default) in the
  prefjax layout and, with `mesh`, placed straight into their target shardings.
  `config_overrides` (e.g. `scan_layers=True`, `dtype="bfloat16"`) apply to the returned cfg.
  """
  path = pathlib.Path(path)
  cfg_file = path / "config.json"
  if not cfg_file.exists():
    raise ValueError(f"{cfg_file} does not exist: not a Hugging Face checkpoint dir")
  scan = config_overrides.pop("scan_layers", False)
  cfg = config_from_hf(json.loads(cfg_file.read_text()), **config_overrides)
  reader = CheckpointReader(path)
  return params_from_hf_tensors(cfg, reader.get, mesh=mesh, rules=rules, scan_layers=scan)


def params_from_hf_tensors(cfg: ModelConfig, get: Callable[[str], np.ndarray], *,
                           mesh: Mesh | None = None, rules: Any = None,
                           scan_layers: bool = False) -> tuple[ModelConfig, api.Params]:
  """Builds prefjax params of the unscanned `cfg` from HF-named tensors, one at a time.

  `get(name)` returns the HF tensor `name` (torch layout) as a numpy array; each is converted
  to cfg.param_dtype in the prefjax layout and, with `mesh`, placed straight into its target
  sharding. Returns `(cfg, params)`, stacked under `layers` when `scan_layers`.
  """
  shardings = api.param_shardings(cfg, mesh, rules) if mesh is not None else None
  dtype = cfg.jnp_param_dtype
  params: dict = {}
  for target, names, to_ours, _ in conversion_entries(cfg):
    x = to_ours(*[np.asarray(get(name), np.float32) for name in names]).astype(dtype)
    _set(params, target, jax.device_put(x, _get(shardings, target)) if mesh is not None
         else jnp.asarray(x))
  if cfg.num_reward_heads:
    b = np.zeros((cfg.num_reward_heads,), dtype)
    _set(params, ("reward_head", "b"), jax.device_put(b, shardings["reward_head"]["b"])
         if mesh is not None else jnp.asarray(b))
  if scan_layers:
    cfg = cfg.replace(scan_layers=True)
    params = api.stack_layers(cfg, params)
    if mesh is not None:
      params = jax.device_put(params, api.param_shardings(cfg, mesh, rules))
  return cfg, params


def _hf_tensors(cfg: ModelConfig, params: api.Params,
                dtype: Any) -> Iterator[tuple[str, np.ndarray]]:
  for source, names, _, to_hf in conversion_entries(cfg):
    x = np.asarray(jax.device_get(_get(params, source)), np.float32)
    for name, arr in zip(names, to_hf(x)):
      yield name, np.ascontiguousarray(arr.astype(dtype))


def save_hf_checkpoint(cfg: ModelConfig, params: api.Params, path: str | os.PathLike, *,
                       max_shard_size: int | str = "5GB", dtype: str | None = None) -> None:
  """Writes config.json + (sharded) safetensors (+ index) loadable by transformers'
  `from_pretrained`. `dtype` (e.g. "bfloat16") defaults to cfg.param_dtype. One tensor is
  gathered to the host at a time.

  Raises:
    ValueError: when the config has no transformers equivalent, or a reward head has a
      non-zero bias (HF `score` layers have none).
  """
  params = api.unstack_layers(cfg, params)
  flat_cfg = cfg.replace(scan_layers=False)
  hf = config_to_hf(flat_cfg)
  if cfg.num_reward_heads and np.any(np.asarray(jax.device_get(params["reward_head"]["b"]))):
    raise ValueError("reward_head/b is non-zero but HF *ForSequenceClassification `score` has no "
                     "bias; fold or zero it before export")
  out_dtype = jnp.dtype(dtype or cfg.param_dtype)
  hf["dtype"] = str(out_dtype)
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  for old in list(path.glob("*.safetensors")) + list(path.glob("model.safetensors.index.json")):
    old.unlink()
  write_sharded(path, _hf_tensors(flat_cfg, params, out_dtype), max_shard_size=max_shard_size)
  (path / "config.json").write_text(json.dumps(hf, indent=2))
