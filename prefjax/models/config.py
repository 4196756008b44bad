"""Model configuration and named presets (Gemma 1/2/3, Llama 3, Mistral, tiny test sizes).

One frozen, hashable dataclass describes every supported decoder; the families differ only by
fields (activation, norm convention, attention pattern, soft-caps, RoPE), never by code path.

Sources for the presets:
  Gemma 1: Gemma Team, "Gemma: Open Models Based on Gemini Research and Technology" (2024),
    and google-deepmind/gemma `transformer.py` (`gemma_2b`, `gemma_7b`).
  Gemma 2: Gemma Team, "Gemma 2: Improving Open Language Models at a Practical Size" (2024).
  Gemma 3: Gemma Team, "Gemma 3 Technical Report" (2025), text decoder only.
  Llama 3: Grattafiori et al., "The Llama 3 Herd of Models" (2024), Llama-3.1 RoPE scaling.
  Mistral: Jiang et al., "Mistral 7B" (2023), v0.1 with a 4096-token sliding window.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp

GLOBAL = "global"
LOCAL = "local"
REMAT_POLICIES = ("none", "full", "save_dots")
FAMILIES = ("gemma", "gemma2", "gemma3", "llama", "mistral")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Decoder-only transformer hyperparameters (hashable: usable as a static jit argument)."""

  vocab_size: int
  embed_dim: int  # D
  num_layers: int
  num_heads: int  # N
  num_kv_heads: int  # K (1 = MQA, N = MHA with qkv_einsum, else GQA)
  head_dim: int  # H
  hidden_dim: int  # MLP width F
  family: str = "gemma"  # checkpoint naming family: gemma | gemma2 | gemma3 | llama | mistral
  activation: str = "gelu"  # "gelu" (tanh approx.; GeGLU) | "silu" (SwiGLU)
  tie_embeddings: bool = True  # False: separate `lm_head/w` [V, D]
  scale_embeddings: bool = True  # multiply input embeddings by sqrt(D) (Gemma)
  norm_scale_plus_one: bool = True  # RMSNorm output * (1 + scale) (Gemma) vs * scale (Llama)
  norm_eps: float = 1e-6
  transpose_gating_einsum: bool = False  # gating_einsum [2, F, D] (Gemma 2 9B/27B, Gemma 3) vs [2, D, F]
  use_post_attn_norm: bool = False
  use_post_ffw_norm: bool = False
  use_qk_norm: bool = False  # Gemma 3 `_query_norm` / `_key_norm`
  attention_pattern: tuple[str, ...] = (GLOBAL,)  # repeated over the layers; "local" = sliding
  sliding_window: int | None = None  # keys with q_pos - k_pos < window (local layers)
  query_pre_attn_scalar: float | None = None  # queries scaled by its **-0.5; None = head_dim
  attn_logit_softcap: float | None = None
  final_logit_softcap: float | None = None
  rope_base: float = 10_000.0  # global layers
  rope_local_base: float | None = None  # local layers (Gemma 3); None = the global RoPE
  rope_scaling: str = "none"  # global layers: none | linear | llama3
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0  # llama3 scaling only
  rope_high_freq_factor: float = 4.0  # llama3 scaling only
  rope_original_max_positions: int = 8192  # llama3 scaling only
  max_position_embeddings: int = 8192  # recorded in exported configs
  num_reward_heads: int = 0  # 0 = language model; > 0 adds `reward_head/{w,b}`
  bos_token_id: int = 2
  eos_token_id: int = 1
  pad_token_id: int = 0
  # Compute dtype (bfloat16 on TPU, and on CPUs with AVX-512-BF16 / AMX). bfloat16 models
  # contract bf16 operands with float32 accumulation, forward and backward (mixed_einsum.py).
  dtype: str = "float32"
  param_dtype: str = "float32"  # master weights
  remat: str = "none"  # none | full | save_dots
  scan_layers: bool = False  # nn.scan over repeats of `attention_pattern`

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat={self.remat!r}; expected one of {REMAT_POLICIES}")
    if self.family not in FAMILIES:
      raise ValueError(f"family={self.family!r}; expected one of {FAMILIES}")
    if self.activation not in ("gelu", "silu"):
      raise ValueError(f"activation={self.activation!r}; expected 'gelu' or 'silu'")
    if any(t not in (GLOBAL, LOCAL) for t in self.attention_pattern):
      raise ValueError(f"attention_pattern={self.attention_pattern}: entries must be 'global'/'local'")
    if LOCAL in self.attention_pattern and not self.sliding_window:
      raise ValueError("a 'local' layer in attention_pattern needs sliding_window")
    if self.rope_scaling not in ("none", "linear", "llama3"):
      raise ValueError(f"rope_scaling={self.rope_scaling!r}; expected none | linear | llama3")

  @property
  def layer_types(self) -> tuple[str, ...]:
    """Attention type of every layer: the pattern repeated and truncated to `num_layers`."""
    p = self.attention_pattern
    return tuple(p[i % len(p)] for i in range(self.num_layers))

  @property
  def use_qkv_einsum(self) -> bool:
    """MHA models store one fused `qkv_einsum` (official Gemma 7B layout)."""
    return self.num_kv_heads == self.num_heads

  @property
  def query_scale(self) -> float:
    return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

  @property
  def has_lm_head(self) -> bool:
    """Untied LM head exists for untied language models (not for untied reward models)."""
    return not self.tie_embeddings and self.num_reward_heads == 0

  @property
  def jnp_dtype(self) -> Any:
    return jnp.dtype(self.dtype)

  @property
  def jnp_param_dtype(self) -> Any:
    return jnp.dtype(self.param_dtype)

  def replace(self, **overrides: Any) -> "ModelConfig":
    _check_moved(overrides)
    return dataclasses.replace(self, **overrides)


# Fields of earlier versions that moved to `prefjax.models.Kernels` (how the model is computed,
# not what it is): a workdir's `config.json` may still hold them; `config_from_dict` drops them.
MOVED_TO_KERNELS = ("attention_impl", "attention_query_block", "attention_causal_block",
                    "attention_key_tile")


def _check_moved(overrides: dict) -> None:
  moved = sorted(set(overrides) & set(MOVED_TO_KERNELS))
  if moved:
    raise ValueError(f"{moved} are no longer ModelConfig fields: pass them as kernel options "
                     "(prefjax.models.Kernels, e.g. `forward(..., kernels=Kernels.for_platform("
                     "'cpu', attention_key_tile=64))`; CLI: --config.kernels.*)")


def _gemma1(**kw: Any) -> ModelConfig:
  return ModelConfig(family="gemma", **kw)


def _gemma2(**kw: Any) -> ModelConfig:
  kw.setdefault("sliding_window", 4096)
  return ModelConfig(
      family="gemma2", use_post_attn_norm=True, use_post_ffw_norm=True,
      attention_pattern=(LOCAL, GLOBAL), attn_logit_softcap=50.0, final_logit_softcap=30.0, **kw)


def _gemma3(**kw: Any) -> ModelConfig:
  kw.setdefault("rope_scaling", "linear")
  kw.setdefault("rope_factor", 8.0)
  kw.setdefault("vocab_size", 262_144)
  kw.setdefault("max_position_embeddings", 131_072)
  return ModelConfig(
      family="gemma3", use_post_attn_norm=True, use_post_ffw_norm=True, use_qk_norm=True,
      transpose_gating_einsum=True, attention_pattern=(LOCAL,) * 5 + (GLOBAL,),
      rope_base=1_000_000.0, rope_local_base=10_000.0, **kw)


def _llama(**kw: Any) -> ModelConfig:
  kw.setdefault("family", "llama")
  return ModelConfig(
      activation="silu", tie_embeddings=False, scale_embeddings=False, norm_scale_plus_one=False,
      norm_eps=1e-5, **kw)


PRESETS: dict[str, ModelConfig] = {
    "gemma_2b": _gemma1(vocab_size=256_128, embed_dim=2048, num_layers=18, num_heads=8,
                        num_kv_heads=1, head_dim=256, hidden_dim=16_384),
    "gemma_7b": _gemma1(vocab_size=256_128, embed_dim=3072, num_layers=28, num_heads=16,
                        num_kv_heads=16, head_dim=256, hidden_dim=24_576),
    "gemma2_2b": _gemma2(vocab_size=256_128, embed_dim=2304, num_layers=26, num_heads=8,
                         num_kv_heads=4, head_dim=256, hidden_dim=9216),
    "gemma2_9b": _gemma2(vocab_size=256_128, embed_dim=3584, num_layers=42, num_heads=16,
                         num_kv_heads=8, head_dim=256, hidden_dim=14_336,
                         transpose_gating_einsum=True),
    "gemma2_27b": _gemma2(vocab_size=256_128, embed_dim=4608, num_layers=46, num_heads=32,
                          num_kv_heads=16, head_dim=128, hidden_dim=36_864,
                          transpose_gating_einsum=True, query_pre_attn_scalar=4608 / 32),
    "gemma3_1b": _gemma3(embed_dim=1152, num_layers=26, num_heads=4, num_kv_heads=1, head_dim=256,
                         hidden_dim=6912, sliding_window=512, rope_scaling="none", rope_factor=1.0,
                         max_position_embeddings=32_768),
    "gemma3_4b": _gemma3(embed_dim=2560, num_layers=34, num_heads=8, num_kv_heads=4, head_dim=256,
                         hidden_dim=10_240, sliding_window=1024),
    "gemma3_12b": _gemma3(embed_dim=3840, num_layers=48, num_heads=16, num_kv_heads=8,
                          head_dim=256, hidden_dim=15_360, sliding_window=1024),
    "gemma3_27b": _gemma3(embed_dim=5376, num_layers=62, num_heads=32, num_kv_heads=16,
                          head_dim=128, hidden_dim=21_504, sliding_window=1024,
                          query_pre_attn_scalar=5376 / 32),
    "llama3_8b": _llama(vocab_size=128_256, embed_dim=4096, num_layers=32, num_heads=32,
                        num_kv_heads=8, head_dim=128, hidden_dim=14_336, rope_base=500_000.0,
                        bos_token_id=128_000, eos_token_id=128_001, pad_token_id=128_001),
    "llama3_1_8b": _llama(vocab_size=128_256, embed_dim=4096, num_layers=32, num_heads=32,
                          num_kv_heads=8, head_dim=128, hidden_dim=14_336, rope_base=500_000.0,
                          rope_scaling="llama3", rope_factor=8.0, max_position_embeddings=131_072,
                          bos_token_id=128_000, eos_token_id=128_001, pad_token_id=128_001),
    "mistral_7b": _llama(family="mistral", vocab_size=32_000, embed_dim=4096, num_layers=32,
                         num_heads=32, num_kv_heads=8, head_dim=128, hidden_dim=14_336,
                         attention_pattern=(LOCAL,), sliding_window=4096, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0, max_position_embeddings=32_768),
    # The benchmark model of TOOLCHAIN.md: Gemma-1 style, 46M parameters.
    "bench_46m": _gemma1(vocab_size=32_000, embed_dim=512, num_layers=8, num_heads=8,
                         num_kv_heads=1, head_dim=64, hidden_dim=2048),
    # Tiny test sizes (seconds on CPU).
    "tiny_gemma": _gemma1(vocab_size=256, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=1,
                          head_dim=8, hidden_dim=64),
    "tiny_gemma_mha": _gemma1(vocab_size=256, embed_dim=32, num_layers=2, num_heads=4,
                              num_kv_heads=4, head_dim=8, hidden_dim=64),
    "tiny_gemma2": _gemma2(vocab_size=256, embed_dim=32, num_layers=4, num_heads=4, num_kv_heads=2,
                           head_dim=8, hidden_dim=64, sliding_window=4,
                           transpose_gating_einsum=True, query_pre_attn_scalar=16.0),
    "tiny_gemma3": _gemma3(vocab_size=256, embed_dim=32, num_layers=6, num_heads=4,
                           num_kv_heads=2, head_dim=8, hidden_dim=64, sliding_window=4,
                           max_position_embeddings=512),
    "tiny_llama": _llama(vocab_size=256, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                         head_dim=8, hidden_dim=64, rope_base=500_000.0, rope_scaling="llama3",
                         rope_factor=8.0, rope_original_max_positions=16,
                         max_position_embeddings=512, bos_token_id=1, eos_token_id=2),
    "tiny_mistral": _llama(family="mistral", vocab_size=256, embed_dim=32, num_layers=2,
                           num_heads=4, num_kv_heads=2, head_dim=8, hidden_dim=64,
                           attention_pattern=(LOCAL,), sliding_window=4, rope_base=1_000_000.0,
                           max_position_embeddings=512, bos_token_id=1, eos_token_id=2),
}


def get_config(name: str, **overrides: Any) -> ModelConfig:
  """Returns preset `name` with dataclass field `overrides` (e.g. `dtype="bfloat16"`)."""
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
  _check_moved(overrides)
  return dataclasses.replace(PRESETS[name], **overrides)


def rope_inv_freq(cfg: ModelConfig, layer_type: str) -> tuple[float, ...]:
  """Inverse RoPE frequencies [H/2] for one layer type (static Python floats).

  Local layers use `rope_local_base` unscaled when set (Gemma 3: 10k local, 1M global with linear
  scaling); otherwise every layer uses the global RoPE. `llama3` follows Llama 3.1's smoothed
  per-frequency scaling (`_compute_llama3_parameters` in transformers).
  """
  half = cfg.head_dim // 2
  local_own = layer_type == LOCAL and cfg.rope_local_base is not None
  base = cfg.rope_local_base if local_own else cfg.rope_base
  inv = [base ** (-2.0 * i / cfg.head_dim) for i in range(half)]
  if local_own or cfg.rope_scaling == "none":
    return tuple(inv)
  if cfg.rope_scaling == "linear":
    return tuple(f / cfg.rope_factor for f in inv)
  low_wavelen = cfg.rope_original_max_positions / cfg.rope_low_freq_factor
  high_wavelen = cfg.rope_original_max_positions / cfg.rope_high_freq_factor
  out = []
  for f in inv:
    wavelen = 2 * math.pi / f
    if wavelen < high_wavelen:
      out.append(f)
    elif wavelen > low_wavelen:
      out.append(f / cfg.rope_factor)
    else:
      smooth = (cfg.rope_original_max_positions / wavelen - cfg.rope_low_freq_factor) / (
          cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
      out.append((1 - smooth) * f / cfg.rope_factor + smooth * f)
  return tuple(out)


def config_to_dict(cfg: ModelConfig) -> dict:
  """JSON-ready dict of every field (what a workdir's config.json records as `resolved_model`)."""
  return {f.name: (list(v) if isinstance(v, tuple) else v)
          for f in dataclasses.fields(cfg) for v in [getattr(cfg, f.name)]}


def config_from_dict(d: dict) -> ModelConfig:
  """Inverse of `config_to_dict`; unknown keys are an error (a config from a newer version).

  Keys of earlier versions that are now kernel options (`MOVED_TO_KERNELS`) are dropped: the
  kernels are chosen per platform when the model runs, not stored with it.
  """
  names = {f.name for f in dataclasses.fields(ModelConfig)}
  d = {k: v for k, v in d.items() if k not in MOVED_TO_KERNELS}
  unknown = sorted(set(d) - names)
  if unknown:
    raise ValueError(f"unknown ModelConfig fields {unknown}")
  return ModelConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})
