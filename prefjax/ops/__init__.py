"""Numerics shared by losses and models: chunked log-probs, masked reductions, diagnostics.

Pure functions over arrays; nothing stateful. Shape letters: B batch, T length,
D model, V vocab. Everything returns float32 (f32 accumulation for bf16 inputs).

  token_logps_from_logits(logits [..., T, V], targets [..., T])            -> [..., T]
  token_logps_from_hidden(hidden [B, T, D], unembedding [V, D], targets)    -> [B, T]
      chunked along T, so float32 [B, T, V] logits never exist (V = 256k)
  masked_sum / masked_mean(x, mask, axis=-1)     (mean of an empty mask is 0)
  sequence_logps(token_logps [B, T], loss_mask)                              -> ([B], [B])
  segment_logps(token_logps [R, T], loss_mask, segment_ids, num_segments)    -> ([R, S], [R, S])
  topk_entropy_and_mass(hidden, unembedding, k=10)                           -> ([B, T], [B, T])
  token_kl(policy_token_logps, ref_token_logps, estimator="k1")             -> [B, T]
  token_kl_from_hidden(hidden_p, unembedding_p, hidden_r, unembedding_r)    -> [B, T]
"""
from prefjax.ops._chunks import softcap
from prefjax.ops.diagnostics import token_kl
from prefjax.ops.diagnostics import token_kl_from_hidden
from prefjax.ops.diagnostics import token_kl_from_logits
from prefjax.ops.diagnostics import topk_entropy_and_mass
from prefjax.ops.diagnostics import topk_entropy_and_mass_from_logits
from prefjax.ops.logprobs import token_logps_from_hidden
from prefjax.ops.logprobs import token_logps_from_logits
from prefjax.ops.masked import masked_mean
from prefjax.ops.masked import masked_sum
from prefjax.ops.masked import segment_logps
from prefjax.ops.masked import sequence_logps

__all__ = [
    "masked_mean",
    "masked_sum",
    "segment_logps",
    "sequence_logps",
    "softcap",
    "token_kl",
    "token_kl_from_hidden",
    "token_kl_from_logits",
    "token_logps_from_hidden",
    "token_logps_from_logits",
    "topk_entropy_and_mass",
    "topk_entropy_and_mass_from_logits",
]
