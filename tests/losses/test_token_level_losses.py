"""TDPO and LD-DPO vs NumPy references written token by token from the papers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefjax import losses as L

B, T = 6, 9


def _ls(x):
  return -np.logaddexp(0.0, -x)


def make_token_inputs(seed=0):
  rng = np.random.default_rng(seed)
  lens_c = np.array([9, 3, 5, 0, 7, 1])
  lens_r = np.array([2, 3, 8, 4, 0, 9])
  # Left offset (prompt) of 0 or 1 token; padding is filled with garbage.
  def mask(lens):
    m = np.zeros((B, T), np.float32)
    for i, n in enumerate(lens):
      off = min(i % 2, T - n)
      m[i, off:off + n] = 1
    return m
  g = lambda: rng.normal(-1.5, 1.0, (B, T)).astype(np.float32)
  kl = lambda: rng.uniform(0, 0.3, (B, T)).astype(np.float32)
  return dict(chosen=g(), rejected=g(), ref_chosen=g(), ref_rejected=g(),
              chosen_mask=mask(lens_c), rejected_mask=mask(lens_r),
              chosen_kl=kl(), rejected_kl=kl())


def to_tl(d):
  return L.TokenLogps(**{k: jnp.asarray(v) for k, v in d.items()})


def np_ld_logps(x, mask, shared, alpha):
  """Σ over the first `shared` response tokens + α·Σ over the rest (loop, float64)."""
  out = np.zeros(B)
  for i in range(B):
    k = 0
    for t in range(T):
      if mask[i, t]:
        k += 1
        out[i] += (1.0 if k <= shared[i] else alpha) * float(x[i, t])
  return out


@pytest.mark.parametrize("ld_alpha", [0.0, 0.3, 1.0])
def test_ld_dpo_matches_reference(ld_alpha):
  d = make_token_inputs()
  shared = np.minimum(d["chosen_mask"].sum(1), d["rejected_mask"].sum(1))
  pc = np_ld_logps(d["chosen"], d["chosen_mask"], shared, ld_alpha)
  pr = np_ld_logps(d["rejected"], d["rejected_mask"], shared, ld_alpha)
  rc = np_ld_logps(d["ref_chosen"], d["chosen_mask"], shared, ld_alpha)
  rr = np_ld_logps(d["ref_rejected"], d["rejected_mask"], shared, ld_alpha)
  beta = 0.2
  out = L.get_token_level("ld_dpo")(to_tl(d), beta=beta, ld_alpha=ld_alpha)
  np.testing.assert_allclose(out.loss, -_ls(beta * ((pc - rc) - (pr - rr))), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.chosen_rewards, beta * (pc - rc), rtol=1e-5, atol=1e-6)
  if ld_alpha == 1.0:  # no down-weighting: plain DPO on masked sums
    np.testing.assert_allclose(out.loss, L.sigmoid(L.to_paired(to_tl(d)), beta=beta).loss, rtol=1e-6)


def test_to_paired_masks_and_lengths():
  d = make_token_inputs()
  p = L.to_paired(to_tl(d))
  np.testing.assert_allclose(p.chosen, (d["chosen"] * d["chosen_mask"]).sum(1), rtol=1e-6)
  np.testing.assert_array_equal(p.chosen_lengths, d["chosen_mask"].sum(1))
  np.testing.assert_array_equal(p.rejected_lengths, d["rejected_mask"].sum(1))


def np_tdpo(d, beta, alpha=None):
  s = lambda x, m: (x.astype(np.float64) * m).sum(1)
  mw = s(d["chosen"] - d["ref_chosen"], d["chosen_mask"])
  ml = s(d["rejected"] - d["ref_rejected"], d["rejected_mask"])
  kw, kl = s(d["chosen_kl"], d["chosen_mask"]), s(d["rejected_kl"], d["rejected_mask"])
  u = beta * mw - beta * ml
  a = 1.0 if alpha is None else alpha
  loss = -_ls(u - a * beta * (kl - kw))
  return loss, beta * (mw + kw), beta * (ml + kl)


@pytest.mark.parametrize("name,kw", [("tdpo1", {}), ("tdpo2", {}), ("tdpo", dict(tdpo_alpha=0.8, beta=0.3))])
def test_tdpo_matches_reference(name, kw):
  d = make_token_inputs(seed=1)
  out = L.get_token_level(name)(to_tl(d), **kw)
  alpha = None if name == "tdpo1" else kw.get("tdpo_alpha", 0.5)
  loss, cr, rr = np_tdpo(d, kw.get("beta", 0.1), alpha)
  np.testing.assert_allclose(out.loss, loss, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.chosen_rewards, cr, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.rejected_rewards, rr, rtol=1e-5, atol=1e-6)


def test_tdpo2_stops_gradient_of_chosen_kl_and_tdpo1_does_not():
  tl = to_tl(make_token_inputs(seed=2))
  g1, g2 = jax.jit(lambda t: (jax.grad(lambda x: jnp.sum(L.tdpo1(x).loss))(t),
                              jax.grad(lambda x: jnp.sum(L.tdpo2(x).loss))(t)))(tl)
  np.testing.assert_array_equal(g2.chosen_kl, 0.0)
  assert np.any(np.asarray(g1.chosen_kl) != 0) and np.any(np.asarray(g2.rejected_kl) != 0)
  # Masked positions never get gradient.
  np.testing.assert_array_equal(np.asarray(g1.chosen) * (1 - np.asarray(tl.chosen_mask)), 0.0)


def test_token_level_errors_registry_and_dtypes():
  d = make_token_inputs()
  no_kl = to_tl(d).replace(chosen_kl=None)
  with pytest.raises(ValueError, match="tdpo2.*chosen_kl"):
    L.get_token_level("tdpo")(no_kl)
  with pytest.raises(ValueError, match="ld_dpo.*ref_chosen"):
    L.ld_dpo(to_tl(d).replace(ref_chosen=None))
  assert L.token_level_names() == ["ld_dpo", "tdpo", "tdpo1", "tdpo2"]
  for n in L.token_level_names():
    doc = L.get_token_level(n).__doc__
    assert "et al." in doc, n
    assert not set(L.token_level_names()) & set(L.names())
  tl = to_tl(d)
  tl16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), tl)
  for n in ("tdpo1", "ld_dpo"):
    f = L.get_token_level(n)
    e, j, h = f(tl), jax.jit(f)(tl), f(tl16)
    np.testing.assert_allclose(j.loss, e.loss, rtol=1e-6, atol=1e-6)
    assert h.loss.dtype == jnp.float32
    np.testing.assert_allclose(h.loss, e.loss, rtol=0.05, atol=0.05)
    assert np.all(np.isfinite(e.loss))  # rows with empty responses included
