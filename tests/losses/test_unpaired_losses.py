"""KTO, APO-zero-unpaired and BCO vs NumPy references from the papers' formulas."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefjax import losses as L


def _sig(x):
  return 1 / (1 + np.exp(-x))


def make(seed=0, b=10, kl_shift=0.0):
  rng = np.random.default_rng(seed)
  d = dict(logps=rng.normal(-30, 8, b), ref_logps=rng.normal(-30, 8, b),
           label=rng.integers(0, 2, b).astype(bool),
           kl_logps=rng.normal(-40, 5, b), kl_ref_logps=rng.normal(-40, 5, b))
  d["kl_logps"] = d["kl_logps"] + kl_shift
  return {k: (v.astype(np.float32) if v.dtype != bool else v) for k, v in d.items()}


def to_u(d):
  return L.UnpairedLogps(**{k: jnp.asarray(v) for k, v in d.items()})


@pytest.mark.parametrize("shift", [-20.0, 20.0])  # z0 clamped at 0 / positive
def test_kto_matches_reference(shift):
  d = make(kl_shift=shift)
  beta, wd, wu = 0.2, 1.3, 0.7
  z0 = max(0.0, float(np.mean(d["kl_logps"].astype(np.float64) - d["kl_ref_logps"])))
  r = d["logps"].astype(np.float64) - d["ref_logps"]
  want = np.where(d["label"], wd * (1 - _sig(beta * (r - z0))), wu * (1 - _sig(beta * (z0 - r))))
  out = L.kto(to_u(d), beta=beta, desirable_weight=wd, undesirable_weight=wu)
  np.testing.assert_allclose(out.loss, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.rewards, beta * r, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out.aux["kl"], z0, rtol=1e-5, atol=1e-6)
  if shift < 0:
    assert float(out.aux["kl"]) == 0.0
  # Explicit z0 overrides the estimate.
  np.testing.assert_allclose(L.kto(to_u(d), beta=beta, kl=jnp.float32(3.0)).loss,
                             np.where(d["label"], 1 - _sig(beta * (r - 3)), 1 - _sig(beta * (3 - r))),
                             rtol=1e-5, atol=1e-6)


def test_kto_reference_point_has_no_gradient_and_signs():
  u = to_u(make(kl_shift=20.0))
  f = lambda lp, kl, klr: jnp.sum(L.kto(u.replace(logps=lp, kl_logps=kl, kl_ref_logps=klr)).loss)
  g, gkl, gklr = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(u.logps, u.kl_logps, u.kl_ref_logps)
  np.testing.assert_array_equal(gkl, 0.0)
  np.testing.assert_array_equal(gklr, 0.0)
  lab = np.asarray(u.label)
  assert np.all(np.asarray(g)[lab] < 0) and np.all(np.asarray(g)[~lab] > 0)


def test_kto_errors_and_jit_bf16():
  d = make()
  with pytest.raises(ValueError, match="kto.*kl_logps"):
    L.kto(to_u(d).replace(kl_logps=None, kl_ref_logps=None))
  u = to_u(d)
  e = L.kto(u)
  np.testing.assert_allclose(jax.jit(L.kto)(u).loss, e.loss, rtol=1e-6, atol=1e-7)
  h = L.kto(jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x, u))
  assert h.loss.dtype == jnp.float32
  np.testing.assert_allclose(h.loss, e.loss, atol=0.05)
  assert L.unpaired_names() == ["apo_zero_unpaired", "kto"]
  assert L.get_unpaired("kto") is L.kto


def test_apo_zero_unpaired_matches_reference():
  d = make(seed=3)
  r = d["logps"].astype(np.float64) - d["ref_logps"]
  want = np.where(d["label"], 1 - _sig(0.1 * r), _sig(0.1 * r))
  np.testing.assert_allclose(L.apo_zero_unpaired(to_u(d)).loss, want, rtol=1e-5, atol=1e-6)


def test_bco_running_mean_state_threads_explicitly():
  state = L.BCOState.init()
  run_mean, n = 0.0, 0
  step = jax.jit(lambda u, s: L.bco(u, s, beta=0.1))
  for seed in range(3):
    d = make(seed=seed)
    r = 0.1 * (d["logps"].astype(np.float64) - d["ref_logps"])
    n += 1
    run_mean += (r.mean() - run_mean) / n  # cumulative mean of batch means
    want = np.where(d["label"], np.logaddexp(0, -(r - run_mean)), np.logaddexp(0, r - run_mean))
    out, state = step(to_u(d), state)
    np.testing.assert_allclose(out.loss, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.mean, run_mean, rtol=1e-5)
    np.testing.assert_allclose(out.aux["delta"], run_mean, rtol=1e-5)
    assert float(state.count) == n
  # δ carries no gradient.
  u = to_u(make())
  g = jax.grad(lambda lp: jnp.sum(L.bco(u.replace(logps=lp), L.BCOState.init())[0].loss))(u.logps)
  lab = np.asarray(u.label)
  assert np.all(np.asarray(g)[lab] < 0) and np.all(np.asarray(g)[~lab] > 0)


def test_unpaired_metrics():
  d = make()
  u = to_u(d)
  out = L.kto(u)
  m = L.unpaired_metrics(u, out)
  r = 0.1 * (d["logps"].astype(np.float64) - d["ref_logps"])
  np.testing.assert_allclose(m["rewards/chosen"], r[d["label"]].mean(), rtol=1e-5)
  np.testing.assert_allclose(m["rewards/rejected"], r[~d["label"]].mean(), rtol=1e-5)
  np.testing.assert_allclose(m["logps/chosen"], d["logps"][d["label"]].mean(), rtol=1e-5)
  assert "kl" in m
