"""Analytic model FLOPs of a training step (the numerator of MFU).

Counted as in Kaplan et al. 2020 / Chowdhery et al. 2022 (PaLM, appendix B): a forward
pass costs 2 FLOPs per token per weight of every matmul plus the attention scores and
their weighted sum, 2 * 2 * T_eff * N * H per token per layer, where T_eff is the mean
number of keys a query sees (about T / 2 causal, at most the window on local layers); the
backward pass costs twice the forward. The embedding lookup is free; the vocabulary head
is a D x V matmul at every position. Rematerialisation is not counted (that is hardware,
not model, FLOPs).
"""
from __future__ import annotations

from typing import Any

from prefjax.models.config import LOCAL


def matmul_params_per_token(cfg: Any) -> int:
  """Weights a token meets in the decoder's matmuls (attention, MLP, vocabulary head)."""
  d, n, k, h, f = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_dim
  per_layer = d * n * h + 2 * d * k * h + n * h * d + 3 * d * f
  head = d * (cfg.num_reward_heads if cfg.num_reward_heads else cfg.vocab_size)
  return cfg.num_layers * per_layer + head


def attention_flops_per_token(cfg: Any, seq_len: int) -> float:
  """Forward attention FLOPs per query token (scores + weighted sum), causal, all layers."""
  total = 0.0
  for kind in cfg.layer_types:
    keys = seq_len / 2
    if kind == LOCAL and cfg.sliding_window:
      keys = min(keys, float(cfg.sliding_window))
    total += 4 * keys * cfg.num_heads * cfg.head_dim
  return total


def forward_flops(cfg: Any, tokens: int, seq_len: int) -> float:
  """Forward-pass FLOPs over `tokens` positions in rows of `seq_len`."""
  return tokens * (2 * matmul_params_per_token(cfg) + attention_flops_per_token(cfg, seq_len))


def step_flops(cfg: Any, tokens: int, seq_len: int, *, reference_forward: bool) -> dict:
  """Model FLOPs of one training step: `{"forward": one forward pass, "attention": its
  causal-attention part, "policy": 3 x forward, "reference": forward or 0, "total"}`."""
  fwd = forward_flops(cfg, tokens, seq_len)
  ref = fwd if reference_forward else 0.0
  return {"forward": fwd, "attention": tokens * attention_flops_per_token(cfg, seq_len),
          "policy": 3 * fwd, "reference": ref, "total": 3 * fwd + ref}


def hardware_flops(model: dict, *, remat: str, dense_attention: bool) -> float:
  """FLOPs the chips execute for `step_flops`' model FLOPs.

  Full remat runs the policy's forward a second time in the backward pass (4 forward
  equivalents instead of 3). Dense attention (XLA's, masked) computes every key of the row,
  about twice the causal work; a flash kernel that skips masked blocks computes about the
  causal part."""
  fwd = model["forward"] + (model["attention"] if dense_attention else 0.0)
  passes = 3 + (1 if remat == "full" else 0) + (1 if model["reference"] else 0)
  return fwd * passes
