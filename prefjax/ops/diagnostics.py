"""Per-token diagnostics of the policy distribution: top-k entropy / mass and KL.

Shape letters: B batch (any leading dims), T length, D model, V vocab, k top-k.

Over-optimisation indicators. Shi, Land, Locatelli, Geist and Bartolo (2024),
"Understanding Likelihood Over-optimisation in Direct Alignment Algorithms"
(arXiv:2410.11677), find that DPO-family training starts hurting generation
quality when (1) the entropy over the top-k tokens decreases and (2) the top-k
probability mass diminishes. Per token:

  mass    = sum_{i in top-k} p_i
  entropy = -sum_{i in top-k} q_i log q_i,   q_i = p_i / mass   (renormalised)

KL. `token_kl` turns per-token log-probs of the sampled tokens into a per-token
KL estimate (Schulman's k1/k2/k3 estimators, http://joschu.net/blog/kl-approx.html);
`token_kl_from_hidden` computes the exact full-distribution
KL(pi || pi_ref) = sum_v pi(v) (log pi(v) - log pi_ref(v)) per token.

The `*_from_hidden` variants scan over chunks of C positions (as
`token_logps_from_hidden`), so float32 [B, T, V] logits never exist; each chunk
is rematerialised (`jax.checkpoint`) if differentiated. The `*_from_logits`
variants take full logits and are meant for small vocabularies and tests. All
arithmetic after the matmul is float32 (f32 accumulation for bf16 inputs).
"""
from __future__ import annotations

from typing import Any, Callable, Literal, Optional

import jax
import jax.numpy as jnp

from prefjax.ops import _chunks


def _topk_stats(z: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """float32 logits [..., V] -> (top-k entropy [...], top-k mass [...])."""
  lse = jax.nn.logsumexp(z, axis=-1)
  top, _ = jax.lax.top_k(z, k)                         # [..., k]
  lse_k = jax.nn.logsumexp(top, axis=-1)
  log_q = top - lse_k[..., None]                       # renormalised top-k distribution
  entropy = -jnp.sum(jnp.exp(log_q) * log_q, axis=-1)
  mass = jnp.exp(lse_k - lse)
  return entropy, mass


def _kl_full(zp: jax.Array, zr: jax.Array) -> jax.Array:
  """float32 logits [..., V] x2 -> KL(softmax(zp) || softmax(zr)) [...]."""
  lp = jax.nn.log_softmax(zp, axis=-1)
  lr = jax.nn.log_softmax(zr, axis=-1)
  return jnp.sum(jnp.exp(lp) * (lp - lr), axis=-1)


def _check_k(k: int, vocab: int) -> None:
  if not 1 <= k <= vocab:
    raise ValueError(f"k must be in [1, V={vocab}], got {k}")


def topk_entropy_and_mass_from_logits(
    logits: jax.Array, *, k: int = 10) -> tuple[jax.Array, jax.Array]:
  """Top-k entropy and mass (Shi et al., 2024) from full logits [..., T, V].

  Returns:
    (entropy [..., T], mass [..., T]) float32: entropy of the renormalised
    top-k distribution (in nats, in [0, log k]) and the top-k probability mass
    (in (0, 1]).
  """
  _check_k(k, logits.shape[-1])
  return _topk_stats(logits.astype(jnp.float32), k)


def topk_entropy_and_mass(
    hidden: jax.Array,
    unembedding: jax.Array,
    *,
    k: int = 10,
    chunk_size: int = 128,
    logit_softcap: Optional[float] = None,
    compute_dtype: Optional[Any] = None,
) -> tuple[jax.Array, jax.Array]:
  """Top-k entropy and mass (Shi et al., 2024) per token, chunked over T.

  Args:
    hidden: [B, T, D] final hidden states (any leading dims instead of B).
    unembedding: [V, D].
    k: number of top tokens (Shi et al. track small k such as 10).
    chunk_size: C, positions per chunk; T need not be a multiple of C.
    logit_softcap: Gemma 2 final-logit cap, or None.
    compute_dtype: matmul operand dtype (default: promoted input dtype);
      accumulation is float32.

  Returns:
    (entropy [B, T], mass [B, T]) float32, as `topk_entropy_and_mass_from_logits`
    on `softcap(hidden @ unembedding.T)`.
  """
  _check_k(k, unembedding.shape[0])
  fn = lambda z: _topk_stats(z, k)
  return _scan_heads(fn, [(hidden, unembedding)], chunk_size, logit_softcap, compute_dtype)


def token_kl(
    policy_token_logps: jax.Array,
    ref_token_logps: jax.Array,
    *,
    estimator: Literal["k1", "k2", "k3"] = "k1",
) -> jax.Array:
  """Per-token KL(pi || pi_ref) estimate from log-probs of tokens sampled from pi.

  With r = log pi_ref(y_t) - log pi(y_t) (Schulman, "Approximating KL
  Divergence", 2020): k1 = -r (unbiased; sums to the sequence log-ratio used by
  DPO's implicit reward), k2 = r^2 / 2, k3 = exp(r) - 1 - r (unbiased, >= 0).
  Exact only in expectation over y ~ pi; use `token_kl_from_hidden` for the
  exact per-position KL.

  Args:
    policy_token_logps: [B, T] log pi(y_t).
    ref_token_logps: [B, T] log pi_ref(y_t).
    estimator: "k1", "k2" or "k3".

  Returns:
    [B, T] float32 (mask it yourself, e.g. with `masked_mean`).
  """
  r = ref_token_logps.astype(jnp.float32) - policy_token_logps.astype(jnp.float32)
  if estimator == "k1":
    return -r
  if estimator == "k2":
    return 0.5 * r * r
  if estimator == "k3":
    return jnp.expm1(r) - r
  raise ValueError(f"unknown estimator {estimator!r}; expected 'k1', 'k2' or 'k3'")


def token_kl_from_logits(policy_logits: jax.Array, ref_logits: jax.Array) -> jax.Array:
  """Exact per-token KL(pi || pi_ref) from full logits [..., T, V] -> [..., T] float32."""
  if policy_logits.shape != ref_logits.shape:
    raise ValueError(f"policy_logits {policy_logits.shape} and ref_logits "
                     f"{ref_logits.shape} differ")
  return _kl_full(policy_logits.astype(jnp.float32), ref_logits.astype(jnp.float32))


def token_kl_from_hidden(
    hidden_p: jax.Array,
    unembedding_p: jax.Array,
    hidden_r: jax.Array,
    unembedding_r: jax.Array,
    *,
    chunk_size: int = 128,
    logit_softcap: Optional[float] = None,
    compute_dtype: Optional[Any] = None,
) -> jax.Array:
  """Exact per-token KL(pi || pi_ref) over the full vocabulary, chunked over T.

  KL_t = sum_v pi(v | t) (log pi(v | t) - log pi_ref(v | t)), where
  pi = softmax(softcap(hidden_p @ unembedding_p.T)) and likewise pi_ref.
  Differentiable (each chunk is rematerialised in the backward pass); wrap the
  reference inputs in `jax.lax.stop_gradient` if they are frozen.

  Args:
    hidden_p: [B, T, D] policy hidden states (any leading dims instead of B).
    unembedding_p: [V, D] policy unembedding.
    hidden_r: [B, T, D_r] reference hidden states (same B, T).
    unembedding_r: [V, D_r] reference unembedding (same V).
    chunk_size: C, positions per chunk; T need not be a multiple of C.
    logit_softcap: Gemma 2 final-logit cap applied to both models, or None.
    compute_dtype: matmul operand dtype (default: promoted input dtype).

  Returns:
    [B, T] float32, >= 0 up to rounding.
  """
  if hidden_p.shape[:-1] != hidden_r.shape[:-1]:
    raise ValueError(f"hidden_p {hidden_p.shape} and hidden_r {hidden_r.shape} must agree "
                     "except in D")
  if unembedding_p.shape[0] != unembedding_r.shape[0]:
    raise ValueError(f"vocabularies differ: {unembedding_p.shape} vs {unembedding_r.shape}")
  return _scan_heads(_kl_full, [(hidden_p, unembedding_p), (hidden_r, unembedding_r)],
                     chunk_size, logit_softcap, compute_dtype)


def _scan_heads(
    fn: Callable[..., Any],
    heads: list[tuple[jax.Array, jax.Array]],
    chunk_size: int,
    logit_softcap: Optional[float],
    compute_dtype: Optional[Any],
):
  """Applies fn(logits_1, ..., logits_h) -> pytree of [N, C] to chunks of T.

  Each (hidden [..., T, D_i], unembedding [V, D_i]) pair gives float32 logits
  [N, C, V] per chunk; fn reduces over V. Returns fn's pytree with [..., T] leaves.
  """
  for i, (h, w) in enumerate(heads):
    _chunks.check_head(h, w, name=f"hidden[{i}]")
  lead_t = heads[0][0].shape[:-1]
  seq_len = lead_t[-1]
  c = _chunks.chunk_len(seq_len, chunk_size)
  cap = None if logit_softcap is None else float(logit_softcap)
  hs, ws = [], []
  for h, w in heads:
    dt = compute_dtype or jnp.result_type(h, w)
    hs.append(_chunks.to_chunks(_chunks.flatten_lead(h.astype(dt), 2)[0], c))
    ws.append(w.astype(dt))

  @jax.checkpoint
  def body(carry, h_cs):
    zs = [_chunks.chunk_logits(h_c, w, cap) for h_c, w in zip(h_cs, ws)]
    return carry, fn(*zs)

  _, out = jax.lax.scan(body, None, hs)
  return jax.tree.map(lambda y: _chunks.from_chunks(y, seq_len).reshape(lead_t), out)
