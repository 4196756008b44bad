"""Tests for prefjax.ops.diagnostics (top-k entropy / mass, KL) against NumPy."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefjax import ops


def _softmax64(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _np_logits(h, w, cap=None):
  z = np.asarray(h, np.float64) @ np.asarray(w, np.float64).T
  return z if cap is None else cap * np.tanh(z / cap)


def _np_topk(z, k):
  """Shi et al. (2024): entropy of the renormalised top-k distribution and top-k mass."""
  p = _softmax64(z)
  top = -np.sort(-p, axis=-1)[..., :k]
  mass = top.sum(-1)
  q = top / mass[..., None]
  return -(q * np.log(q)).sum(-1), mass


def _np_kl(zp, zr):
  p, r = _softmax64(zp), _softmax64(zr)
  return (p * (np.log(p) - np.log(r))).sum(-1)


def _inputs(b=2, t=11, d=8, v=37, seed=0):
  """Policy and reference (hidden [B, T, D], unembedding [V, D])."""
  rng = np.random.default_rng(seed)
  f = lambda *shape, scale=1.0: jnp.asarray(scale * rng.normal(size=shape), jnp.float32)
  return f(b, t, d, scale=2.0), f(v, d), f(b, t, d, scale=2.0), f(v, d)


# k = 1 (entropy 0), k = V (mass 1), T not divisible by the chunk, chunk > T.
@pytest.mark.parametrize("k,chunk,cap", [(1, 4, None), (5, 4, 3.0), (37, 128, None)])
def test_topk_from_hidden_matches_numpy(k, chunk, cap):
  h, w, _, _ = _inputs()
  ent, mass = jax.jit(functools.partial(ops.topk_entropy_and_mass, k=k, chunk_size=chunk,
                                        logit_softcap=cap))(h, w)
  assert ent.shape == mass.shape == (2, 11) and ent.dtype == mass.dtype == jnp.float32
  ref_e, ref_m = _np_topk(_np_logits(h, w, cap), k)
  np.testing.assert_allclose(ent, ref_e, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(mass, ref_m, rtol=1e-5, atol=1e-6)
  if k == 1:
    np.testing.assert_allclose(ent, 0.0, atol=1e-6)
  if k == w.shape[0]:  # all tokens: mass 1, entropy = full entropy
    np.testing.assert_allclose(mass, 1.0, rtol=1e-5)
    p = _softmax64(_np_logits(h, w, cap))
    np.testing.assert_allclose(ent, -(p * np.log(p)).sum(-1), rtol=1e-4, atol=1e-5)


def test_topk_from_logits_bf16_and_bounds():
  z = jnp.asarray(3.0 * np.random.default_rng(3).normal(size=(4, 6, 50)), jnp.bfloat16)
  ent, mass = ops.topk_entropy_and_mass_from_logits(z, k=8)
  ref_e, ref_m = _np_topk(np.asarray(z.astype(jnp.float32)), 8)
  np.testing.assert_allclose(ent, ref_e, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(mass, ref_m, rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(ent) <= np.log(8) + 1e-5) and np.all(np.asarray(mass) <= 1 + 1e-6)
  with pytest.raises(ValueError, match="k must be"):
    ops.topk_entropy_and_mass_from_logits(z, k=51)


def test_token_kl_estimators():
  rng = np.random.default_rng(0)
  lp = rng.normal(size=(3, 5)).astype(np.float32) - 2
  lr = rng.normal(size=(3, 5)).astype(np.float32) - 2
  r = lr.astype(np.float64) - lp
  np.testing.assert_allclose(ops.token_kl(lp, lr), -r, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(ops.token_kl(lp, lr, estimator="k2"), r * r / 2, rtol=1e-5)
  np.testing.assert_allclose(ops.token_kl(lp, lr, estimator="k3"), np.exp(r) - 1 - r,
                             rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(ops.token_kl(lp, lr, estimator="k3")) >= 0)
  with pytest.raises(ValueError, match="estimator"):
    ops.token_kl(lp, lr, estimator="k4")


def test_token_kl_k1_expectation_equals_full_kl():
  # E_{y ~ pi}[log pi(y) - log pi_ref(y)] summed exactly over y is the full KL.
  rng = np.random.default_rng(1)
  zp = jnp.asarray(2.0 * rng.normal(size=(3, 10)), jnp.float32)
  zr = jnp.asarray(2.0 * rng.normal(size=(3, 10)), jnp.float32)
  lp, lr = jax.nn.log_softmax(zp), jax.nn.log_softmax(zr)
  expect = jnp.sum(jnp.exp(lp) * ops.token_kl(lp, lr), -1)
  np.testing.assert_allclose(expect, _np_kl(zp, zr), rtol=1e-5, atol=1e-6)
  expect3 = jnp.sum(jnp.exp(lp) * ops.token_kl(lp, lr, estimator="k3"), -1)
  np.testing.assert_allclose(expect3, _np_kl(zp, zr), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cap", [None, 3.0])
def test_token_kl_from_hidden_matches_numpy(cap):
  hp, wp, hr, wr = _inputs()
  fn = jax.jit(functools.partial(ops.token_kl_from_hidden, chunk_size=4, logit_softcap=cap))
  kl = fn(hp, wp, hr, wr)
  assert kl.shape == (2, 11) and kl.dtype == jnp.float32
  np.testing.assert_allclose(kl, _np_kl(_np_logits(hp, wp, cap), _np_logits(hr, wr, cap)),
                             rtol=1e-4, atol=1e-5)
  same = fn(hp, wp, hp, wp)
  np.testing.assert_allclose(same, 0.0, atol=1e-5)
  kl_l = ops.token_kl_from_logits(jnp.einsum("btd,vd->btv", hp, wp),
                                  jnp.einsum("btd,vd->btv", hr, wr))
  if cap is None:
    np.testing.assert_allclose(kl_l, kl, rtol=1e-4, atol=1e-5)


def test_token_kl_from_hidden_grads_match_naive():
  hp, wp, hr, wr = _inputs(t=9)
  mask = jnp.asarray(np.random.default_rng(7).random((2, 9)) < 0.7)

  def naive(hp, wp):
    hi = jax.lax.Precision.HIGHEST
    kl = ops.token_kl_from_logits(jnp.einsum("btd,vd->btv", hp, wp, precision=hi),
                                  jnp.einsum("btd,vd->btv", hr, wr, precision=hi))
    return ops.masked_mean(kl, mask, axis=(0, 1))

  def chunked(hp, wp):
    return ops.masked_mean(ops.token_kl_from_hidden(hp, wp, hr, wr, chunk_size=4), mask,
                           axis=(0, 1))

  got, ref = jax.jit(lambda hp, wp: (jax.grad(chunked, argnums=(0, 1))(hp, wp),
                                     jax.grad(naive, argnums=(0, 1))(hp, wp)))(hp, wp)
  for a, b in zip(got, ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_token_kl_from_hidden_shape_errors():
  hp, wp, hr, wr = _inputs()
  with pytest.raises(ValueError, match="vocabularies"):
    ops.token_kl_from_hidden(hp, wp, hr, wr[:-1])
  with pytest.raises(ValueError, match="hidden_p"):
    ops.token_kl_from_hidden(hp, wp, hr[:, :-1], wr)
