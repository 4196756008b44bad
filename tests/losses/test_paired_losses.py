"""Paired losses vs independent NumPy references written from the papers' formulas."""
import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefjax import losses as L

B = 12


def _ls(x):  # log σ(x), float64
  return -np.logaddexp(0.0, -x)


def _sig(x):
  return 1.0 / (1.0 + np.exp(-x))


def make_inputs(seed=0, b=B):
  rng = np.random.default_rng(seed)
  lc = rng.integers(1, 40, b).astype(np.float32)
  lr = rng.integers(1, 40, b).astype(np.float32)
  c = (-rng.uniform(0.2, 2.0, b) * lc).astype(np.float32)
  r = (-rng.uniform(0.2, 2.0, b) * lr).astype(np.float32)
  rc = (c + rng.normal(0, 3, b)).astype(np.float32)
  rr = (r + rng.normal(0, 3, b)).astype(np.float32)
  return dict(chosen=c, rejected=r, ref_chosen=rc, ref_rejected=rr,
              chosen_lengths=lc, rejected_lengths=lr)


def to_logps(d):
  return L.PairedLogps(**{k: jnp.asarray(v) for k, v in d.items()})


# ---------------------------------------------------------------- references
def _f(x, kind="reverse_kl", a=0.5):
  """f'(u) at log u = x, Wang et al. 2023 Table 1 (paper's α = 1 − a)."""
  if kind == "reverse_kl":
    return x
  if kind == "forward_kl":  # −1/u, shifted by the constant 1
    return 1.0 - np.exp(-x)
  if kind == "js_divergence":
    u = np.exp(x)
    return np.log(2 * u / (1 + u))
  alpha_p = 1.0 - a  # paper: f'(u) = (1 − u^(−α))/α
  return (1.0 - np.exp(-alpha_p * x)) / alpha_p


def ref_dpo_family(name, d, beta=0.1, label_smoothing=None, length_normalize=True,
                   f_divergence_type="reverse_kl",
                   f_alpha_divergence_coef=0.5, discopop_tau=0.05, alpha=0.01, dpop_lambda=50.0):
  d = {k: v.astype(np.float64) for k, v in d.items()}
  dw, dl = d["chosen"] - d["ref_chosen"], d["rejected"] - d["ref_rejected"]
  fw, fl = _f(dw, f_divergence_type, f_alpha_divergence_coef), _f(dl, f_divergence_type, f_alpha_divergence_coef)
  nw, nl = np.maximum(d["chosen_lengths"], 1), np.maximum(d["rejected_lengths"], 1)
  if not length_normalize:  # IPO as the paper writes it: sequence log-ratios
    nw = nl = 1.0
  eps = label_smoothing if label_smoothing is not None else (1e-3 if name == "exo_pair" else 0.0)
  z = beta * (fw - fl)
  if name in ("sigmoid", "dpo"):
    loss = -(1 - eps) * _ls(z) - eps * _ls(-z)
  elif name == "sigmoid_norm":
    loss = -_ls(beta * (fw / nw - fl / nl))
  elif name == "hinge":
    loss = np.maximum(0.0, 1.0 - z)
  elif name == "ipo":
    loss = (fw / nw - fl / nl - 1 / (2 * beta)) ** 2
  elif name == "exo_pair":  # KL([σ(z), σ(−z)] || [1 − ε, ε])
    p = np.stack([_sig(z), _sig(-z)])
    q = np.array([1 - eps, eps])[:, None]
    loss = np.sum(p * (np.log(p) - np.log(q)), axis=0)
  elif name == "nca_pair":
    loss = -_ls(beta * dw) - 0.5 * _ls(-beta * dw) - 0.5 * _ls(-beta * dl)
  elif name == "robust":
    loss = ((1 - eps) * -_ls(z) - eps * -_ls(-z)) / (1 - 2 * eps)
  elif name == "bco_pair":
    loss = -_ls(beta * dw) - _ls(-beta * dl)
  elif name == "sppo_hard":
    loss = (dw - 1 / (2 * beta)) ** 2 + (dl + 1 / (2 * beta)) ** 2
  elif name == "aot":
    m = np.sort(d["chosen"] - d["rejected"]) - np.sort(d["ref_chosen"] - d["ref_rejected"])
    loss = -(1 - eps) * _ls(beta * m) - eps * _ls(-beta * m)
  elif name == "aot_unpaired":
    m = np.sort(dw) - np.sort(dl)
    loss = -(1 - eps) * _ls(beta * m) - eps * _ls(-beta * m)
  elif name == "apo_zero":
    loss = (1 - _sig(beta * dw)) + _sig(beta * dl)
  elif name == "apo_down":
    loss = _sig(beta * dw) + (1 - _sig(beta * (dw - dl)))
  elif name == "discopop":
    w = _sig(z / discopop_tau)
    loss = (1 - w) * np.log1p(np.exp(-z)) + w * np.exp(-z)
  elif name == "sft":
    loss = -d["chosen"] * len(dw) / d["chosen_lengths"].sum()
  elif name == "rdpo":
    loss = -_ls(beta * (dw - dl) + alpha * (d["chosen_lengths"] - d["rejected_lengths"]))
  elif name == "dpop":
    loss = -_ls(beta * (dw - dl - dpop_lambda * np.maximum(0, d["ref_chosen"] - d["chosen"])))
  else:
    raise KeyError(name)
  return loss, beta * dw, beta * dl


def _nll(d, mode):
  if mode == "sum":
    return -d["chosen"]
  if mode == "example":
    return -d["chosen"] / np.maximum(d["chosen_lengths"], 1)
  # Token mean over the batch, spread so that mean_i(loss_i) is that mean (TRL's CE).
  return -d["chosen"] * len(d["chosen"]) / d["chosen_lengths"].sum()


def ref_reference_free(name, d, beta=None, **kw):
  b = 1.0 if beta is None else beta  # RRHF / SLiC default β = 1 (the papers')
  beta = 0.1 if beta is None else beta  # TRL default for the others
  d = {k: v.astype(np.float64) for k, v in d.items()}
  nw, nl = np.maximum(d["chosen_lengths"], 1), np.maximum(d["rejected_lengths"], 1)
  aw, al = d["chosen"] / nw, d["rejected"] / nl
  if name == "simpo":  # Meng et al. Eq. 6
    g = kw.get("simpo_gamma", kw.get("gamma", 0.5))
    eps = kw.get("label_smoothing", 0.0)
    z = beta * aw - beta * al - g
    return -(1 - eps) * _ls(z) - eps * _ls(-z), beta * aw, beta * al
  if name == "cpo":
    lt = kw.get("loss_type", "sigmoid")
    sw, sl = (aw, al) if lt in ("ipo", "simpo") else (d["chosen"], d["rejected"])
    a = kw.get("alpha", 0.0)
    if a:  # AlphaPO r = (1 − p^(−α))/α
      sw, sl = (1 - np.exp(sw) ** (-a)) / a, (1 - np.exp(sl) ** (-a)) / a
    h = sw - sl
    eps = kw.get("label_smoothing", 0.0)
    if lt == "sigmoid":
      pref = -(1 - eps) * _ls(beta * h) - eps * _ls(-beta * h)
    elif lt == "simpo":
      zz = beta * h - kw.get("simpo_gamma", 0.5)
      pref = -(1 - eps) * _ls(zz) - eps * _ls(-zz)
    elif lt == "hinge":
      pref = np.maximum(0, 1 - beta * h)
    else:
      pref = (h - 1 / (2 * beta)) ** 2
    return pref + kw.get("cpo_alpha", 1.0) * _nll(d, kw.get("nll_normalization", "batch")), beta * sw, beta * sl
  if name == "orpo":  # Hong et al. Eqs. 4, 6, 7 with P = exp(mean log-prob)
    lam = kw.get("lam", beta)
    pw, pl = np.exp(aw), np.exp(al)
    log_or = np.log(pw / (1 - pw)) - np.log(pl / (1 - pl))
    return _nll(d, kw.get("nll_normalization", "example")) - lam * _ls(log_or), lam * aw, lam * al
  if name == "rrhf":
    return b * np.maximum(0, al - aw) + kw.get("nll_weight", 1.0) * _nll(d, "example"), aw, al
  if name == "slic":
    loss = np.maximum(0, kw.get("delta", 1.0) - b * (d["chosen"] - d["rejected"])) + kw.get("slic_lambda", 0.1) * -d["chosen"]
    return loss, b * d["chosen"], b * d["rejected"]
  raise KeyError(name)


def reference(name, d, **kw):
  if name in ("simpo", "cpo", "orpo", "rrhf", "slic"):
    return ref_reference_free(name, d, **kw)
  return ref_dpo_family(name, d, **kw)


# (name, kwargs) cases; every registered name appears at least once.
CASES = [
    ("dpo", {}), ("sigmoid", dict(beta=0.3)), ("sigmoid", dict(label_smoothing=0.2)),
    ("sigmoid", dict(f_divergence_type="forward_kl")),
    ("sigmoid", dict(f_divergence_type="js_divergence")),
    ("sigmoid", dict(f_divergence_type="alpha_divergence")),
    ("sigmoid", dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3)),
    ("sigmoid_norm", {}), ("sigmoid_norm", dict(f_divergence_type="js_divergence")),
    ("hinge", dict(beta=0.5)), ("hinge", dict(f_divergence_type="forward_kl")),
    ("ipo", {}), ("ipo", dict(beta=0.5, f_divergence_type="alpha_divergence")),
    ("ipo", dict(length_normalize=False, beta=0.01)),
    ("exo_pair", {}), ("exo_pair", dict(label_smoothing=0.1, beta=0.3)),
    ("nca_pair", {}), ("robust", dict(label_smoothing=0.1)), ("robust", {}),
    ("bco_pair", {}), ("sppo_hard", {}), ("aot", {}), ("aot", dict(label_smoothing=0.1)),
    ("aot_unpaired", {}), ("apo_zero", {}), ("apo_down", {}), ("discopop", {}),
    ("discopop", dict(discopop_tau=0.5, f_divergence_type="js_divergence")),
    ("sft", {}), ("rdpo", {}), ("rdpo", dict(alpha=0.05, beta=0.2)), ("dpop", {}),
    ("dpop", dict(dpop_lambda=5.0)),
    ("simpo", {}), ("simpo", dict(beta=2.0, gamma=1.0)), ("simpo", dict(label_smoothing=0.1)),
    ("cpo", {}), ("cpo", dict(loss_type="hinge", cpo_alpha=0.5)),
    ("cpo", dict(loss_type="ipo", nll_normalization="sum")),
    ("cpo", dict(loss_type="simpo", simpo_gamma=0.3, cpo_alpha=0.0)),
    ("cpo", dict(alpha=0.5, label_smoothing=0.1, nll_normalization="example")),
    ("orpo", {}), ("orpo", dict(lam=0.5, nll_normalization="batch")),
    ("rrhf", {}), ("rrhf", dict(beta=2.0, nll_weight=0.5)),
    ("slic", {}), ("slic", dict(beta=0.5, delta=2.0, slic_lambda=1.0)),
]


INPUTS = make_inputs(seed=3)


@pytest.fixture(scope="module")
def case_outputs():
  """Every case, eager (op-by-op dispatch reuses compiled primitives: fast)."""
  lp = to_logps(INPUTS)
  return [L.get(n)(lp, **kw) for n, kw in CASES]


@pytest.mark.parametrize("i", range(len(CASES)), ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_matches_numpy_reference(case_outputs, i):
  name, kw = CASES[i]
  out = case_outputs[i]
  loss, cr, rr = reference(name, INPUTS, **kw)
  np.testing.assert_allclose(out.loss, loss, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(out.chosen_rewards, cr, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(out.rejected_rewards, rr, rtol=2e-5, atol=2e-5)
  assert out.loss.shape == (B,) and out.loss.dtype == jnp.float32


def test_registry_complete_and_documented():
  tested = {n for n, _ in CASES}
  assert set(L.names()) == tested, set(L.names()) ^ tested
  assert L.names() == sorted(L.names())
  for n in L.names():
    doc = L.get(n).__doc__ or ""
    assert "et al." in doc or "TRL" in doc, n
    assert any(s in doc for s in ("Eq.", "Eqs.", "objective", "loss", "Sec.")), n
  for n in ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
            "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "simpo",
            "cpo", "orpo", "rrhf", "slic", "rdpo", "dpop"):
    assert n in L.names()
  assert L.get("dpo") is L.get("sigmoid")


def test_unknown_name_lists_names():
  with pytest.raises(ValueError, match="sigmoid"):
    L.get("no_such_loss")
  with pytest.raises(ValueError, match="tdpo"):
    L.get_token_level("nope")


NEEDS_REF = [n for n in L.names() if n not in ("simpo", "cpo", "orpo", "rrhf", "slic")]
NEEDS_LENGTHS = ["ipo", "sigmoid_norm", "rdpo", "simpo", "orpo", "rrhf", "sft"]


@pytest.mark.parametrize("name", NEEDS_REF)
def test_missing_reference_is_a_clear_error(name):
  d = make_inputs()
  lp = L.PairedLogps(jnp.asarray(d["chosen"]), jnp.asarray(d["rejected"]),
                     chosen_lengths=jnp.asarray(d["chosen_lengths"]),
                     rejected_lengths=jnp.asarray(d["rejected_lengths"]))
  with pytest.raises(ValueError, match="ref_chosen") as e:
    L.get(name)(lp)
  assert repr(L.get(name).__name__) in str(e.value)


@pytest.mark.parametrize("name", NEEDS_LENGTHS)
def test_missing_lengths_is_a_clear_error(name):
  d = make_inputs()
  lp = to_logps(d).replace(chosen_lengths=None, rejected_lengths=None)
  with pytest.raises(ValueError, match="chosen_lengths") as e:
    L.get(name)(lp)
  assert name in str(e.value)


def test_reference_free_losses_need_no_reference():
  d = make_inputs()
  lp = to_logps(d).replace(ref_chosen=None, ref_rejected=None)
  for n in ("simpo", "cpo", "orpo", "rrhf", "slic"):
    assert np.all(np.isfinite(L.get(n)(lp).loss))


def test_beta_applied_exactly_once():
  d = make_inputs()
  lp = to_logps(d)
  delta = (d["chosen"] - d["ref_chosen"]) - (d["rejected"] - d["ref_rejected"])
  o1, o2 = L.get("dpo")(lp, beta=0.1), L.get("dpo")(lp, beta=0.2)
  m1 = o1.chosen_rewards - o1.rejected_rewards
  m2 = o2.chosen_rewards - o2.rejected_rewards
  np.testing.assert_allclose(m2, 2 * m1, rtol=1e-6)
  np.testing.assert_allclose(m1, 0.1 * delta, rtol=1e-5, atol=1e-6)
  for beta, out in ((0.1, o1), (0.2, o2)):
    np.testing.assert_allclose(out.loss, -_ls(beta * delta.astype(np.float64)), rtol=1e-5)
    # A β² bug would give −log σ(β²Δ):
    assert not np.allclose(out.loss, -_ls(beta**2 * delta.astype(np.float64)), rtol=1e-3)


def test_label_smoothing_limits():
  d = make_inputs()
  lp = to_logps(d)
  np.testing.assert_array_equal(L.sigmoid(lp, label_smoothing=0.0).loss, L.sigmoid(lp).loss)
  # ε = 0.5 at zero margin: loss ln 2 and no gradient.
  tied = lp.replace(ref_chosen=lp.chosen, ref_rejected=lp.rejected)
  f = lambda c, r: jnp.sum(L.sigmoid(tied.replace(chosen=c, rejected=r), label_smoothing=0.5).loss)
  np.testing.assert_allclose(L.sigmoid(tied, label_smoothing=0.5).loss, math.log(2), rtol=1e-6)
  gc, gr = jax.grad(f, argnums=(0, 1))(tied.chosen, tied.rejected)
  np.testing.assert_allclose(gc, 0.0, atol=1e-7)
  np.testing.assert_allclose(gr, 0.0, atol=1e-7)
  # ε = 0.5 elsewhere: a symmetric loss, minimised at zero margin (gradient pulls Δ to 0).
  out = L.sigmoid(lp, label_smoothing=0.5, beta=0.1)
  flipped = L.sigmoid(lp.replace(chosen=lp.rejected, rejected=lp.chosen,
                                 ref_chosen=lp.ref_rejected, ref_rejected=lp.ref_chosen),
                      label_smoothing=0.5, beta=0.1)
  np.testing.assert_allclose(out.loss, flipped.loss, rtol=1e-6)
  assert np.all(out.loss >= math.log(2) - 1e-6)


N_MISTAKEN = 6


def _grad_inputs():
  """Rows 0-5: a mistaken policy (rejected more likely than chosen, and more so
  than under the reference). Rows 6-11: random, with empty responses (length 0,
  log-prob 0) in rows 6-8 (chosen) and 8-10 (rejected)."""
  d = make_inputs(seed=11)
  n = N_MISTAKEN
  d["chosen"][:n], d["rejected"][:n] = -11.0, -8.0
  d["ref_chosen"][:n], d["ref_rejected"][:n] = -10.0, -9.0
  d["chosen_lengths"][:n] = d["rejected_lengths"][:n] = 5.0
  for k in ("chosen", "ref_chosen", "chosen_lengths"):
    d[k][6:9] = 0.0
  for k in ("rejected", "ref_rejected", "rejected_lengths"):
    d[k][8:11] = 0.0
  return to_logps(d)


@pytest.fixture(scope="module")
def grad_results():
  """Loss and d(sum loss)/d(inputs) of every paired loss (eager: cheapest here)."""
  lp = _grad_inputs()
  out = {}
  for n in L.names():
    f = lambda p, n=n: jnp.sum(L.get(n)(p).loss)
    out[n] = (L.get(n)(lp).loss, jax.grad(f)(lp))
  return out


@pytest.mark.parametrize("name", L.names())
def test_gradient_direction(grad_results, name):
  _, g = grad_results[name]
  gc, gr = g.chosen[:N_MISTAKEN], g.rejected[:N_MISTAKEN]
  if name == "apo_down":  # APO-down lowers both likelihoods by design.
    assert np.all(gc > 0) and np.all(gr > 0)
    return
  assert np.all(gc < 0), (name, gc)
  if name == "sft":  # NLL of the chosen only.
    np.testing.assert_array_equal(gr, 0.0)
  else:
    assert np.all(gr > 0), (name, gr)


@pytest.mark.parametrize("name", L.names())
def test_zero_length_response_no_nan(grad_results, name):
  loss, grads = grad_results[name]
  assert np.all(np.isfinite(loss)), loss
  for leaf in jax.tree.leaves(grads):
    assert np.all(np.isfinite(leaf)), (name, grads)


@pytest.fixture(scope="module")
def dtype_results(case_outputs):
  lp = to_logps(INPUTS)
  lp16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), lp)
  run = lambda p: [L.get(n)(p) for n in L.names()]
  eager = run(lp)
  # Jitted with β traced too (hyperparameters may be traced, e.g. a schedule).
  betas = {n: inspect.signature(L.get(n)).parameters["beta"].default for n in L.names()}
  jitted = jax.jit(lambda p, b: [L.get(n)(p, beta=b[n]) for n in L.names()])(lp, betas)
  out16 = run(lp16)
  exact16 = run(jax.tree.map(lambda x: x.astype(jnp.float32), lp16))
  return {n: (eager[i], jitted[i], out16[i], exact16[i]) for i, n in enumerate(L.names())}


@pytest.mark.parametrize("name", L.names())
def test_bf16_close_to_f32_and_jit_equals_eager(dtype_results, name):
  eager, jitted, out16, exact16 = dtype_results[name]
  np.testing.assert_allclose(jitted.loss, eager.loss, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(jitted.chosen_rewards, eager.chosen_rewards, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(jitted.rejected_rewards, eager.rejected_rewards, rtol=1e-6, atol=1e-6)
  assert out16.loss.dtype == jnp.float32 and out16.chosen_rewards.dtype == jnp.float32
  # Same values as f32 maths on the bf16-rounded inputs...
  np.testing.assert_allclose(out16.loss, exact16.loss, rtol=1e-6, atol=1e-6)
  # ...and close to the f32 inputs (bf16 rounds log-probs of ~1e1 by ~0.1).
  assert np.all(np.isfinite(out16.loss))
  rel = np.abs(np.asarray(out16.loss) - np.asarray(eager.loss)) / (1.0 + np.abs(np.asarray(eager.loss)))
  assert np.median(rel) < 0.1, rel


def test_pytrees_pass_through_jit_and_grad():
  lp = to_logps(make_inputs())
  assert len(jax.tree.leaves(lp)) == 6
  assert len(jax.tree.leaves(lp.replace(chosen_lengths=None, rejected_lengths=None))) == 4
  out = jax.jit(lambda p: L.sigmoid(p, beta=0.1))(lp)
  assert isinstance(out, L.LossOutput)
  g = jax.grad(lambda p: jnp.mean(L.sigmoid(p).loss))(lp)
  assert isinstance(g, L.PairedLogps)
  assert np.all(np.isfinite(g.chosen)) and g.chosen_lengths.shape == (B,)


def test_f_divergence_validation():
  lp = to_logps(make_inputs())
  with pytest.raises(ValueError, match="f_divergence_type"):
    L.sigmoid(lp, f_divergence_type="hellinger")
  np.testing.assert_allclose(
      L.sigmoid(lp, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0).loss,
      L.sigmoid(lp).loss, rtol=1e-6)
  with pytest.raises(ValueError, match="exo_pair"):
    L.exo_pair(lp, label_smoothing=0.0)
  with pytest.raises(ValueError, match="robust"):
    L.robust(lp, label_smoothing=0.5)


def test_aot_is_batch_level():
  d = make_inputs()
  lp = to_logps(d)
  perm = np.random.default_rng(1).permutation(B)
  lp_perm = jax.tree.map(lambda x: x[perm], lp)
  # Per-quantile losses do not follow the pairs: permuting pairs leaves them unchanged.
  np.testing.assert_allclose(L.aot(lp_perm).loss, L.aot(lp).loss, rtol=1e-6)
  np.testing.assert_allclose(L.aot_unpaired(lp_perm).loss, L.aot_unpaired(lp).loss, rtol=1e-6)


def test_paired_metrics_masked():
  d = make_inputs()
  lp = to_logps(d)
  out = L.dpo(lp)
  mask = np.zeros(B, np.float32)
  mask[:7] = 1
  m = L.paired_metrics(lp, out, jnp.asarray(mask))
  cr, rr = 0.1 * (d["chosen"] - d["ref_chosen"]), 0.1 * (d["rejected"] - d["ref_rejected"])
  sel = slice(0, 7)
  np.testing.assert_allclose(m["rewards/chosen"], cr[sel].mean(), rtol=1e-5)
  np.testing.assert_allclose(m["rewards/rejected"], rr[sel].mean(), rtol=1e-5)
  np.testing.assert_allclose(m["rewards/margins"], (cr - rr)[sel].mean(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(m["rewards/accuracies"], (cr > rr)[sel].mean(), rtol=1e-6)
  np.testing.assert_allclose(m["logps/chosen"], d["chosen"][sel].mean(), rtol=1e-5)
  np.testing.assert_allclose(m["logps/rejected"], d["rejected"][sel].mean(), rtol=1e-5)
  full = L.paired_metrics(lp, out)
  np.testing.assert_allclose(full["logps/chosen"], d["chosen"].mean(), rtol=1e-5)
  zero = L.paired_metrics(lp, out, jnp.zeros(B))
  assert all(np.isfinite(v) for v in zero.values())


def test_sharded_batch_equals_single_device():
  """Batch-level losses (sorts, batch token means) see the global batch under jit."""
  devices = np.array(jax.devices())
  if len(devices) < 2:
    pytest.skip("needs several (fake) devices")
  n = 16
  d = make_inputs(seed=5, b=n)
  names = ["aot", "aot_unpaired", "sft", "cpo"]
  mesh = jax.sharding.Mesh(devices[: 8 if n % 8 == 0 else 2], ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  lp = to_logps(d)
  lp_sharded = jax.device_put(lp, sharding)
  fn = jax.jit(lambda p: [L.get(k)(p).loss for k in names])
  for k, a, b in zip(names, fn(lp_sharded), [L.get(k)(lp).loss for k in names]):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=k)


def test_simpo_is_trl_cpo_simpo_without_nll():
  lp = to_logps(INPUTS)
  for kw in ({}, dict(beta=2.0, simpo_gamma=1.0, label_smoothing=0.1)):
    a = L.simpo(lp, **kw)
    b = L.cpo(lp, loss_type="simpo", cpo_alpha=0.0, **kw)
    np.testing.assert_allclose(a.loss, b.loss, rtol=1e-6)
    np.testing.assert_allclose(a.chosen_rewards, b.chosen_rewards, rtol=1e-6)
  np.testing.assert_allclose(L.simpo(lp, gamma=0.7).loss, L.simpo(lp, simpo_gamma=0.7).loss)


def test_hyperparameter_ranges():
  """beta = 0 makes DPO a constant log 2 (no gradient) and beta < 0 trains the inverted
  preference: both are refused, as are smoothing outside [0, 0.5] and non-finite values."""
  import math  # pylint: disable=g-import-not-at-top
  from prefjax import losses  # pylint: disable=g-import-not-at-top
  assert losses.hyperparameter_errors({"beta": 0.1, "label_smoothing": 0.5, "name": "x"}) == []
  assert losses.hyperparameter_errors({"beta": 0.0}) == ["beta=0.0 must be > 0"]
  assert losses.hyperparameter_errors({"beta": -1}) == ["beta=-1 must be > 0"]
  assert losses.hyperparameter_errors({"label_smoothing": -0.1}) == [
      "label_smoothing=-0.1 must be >= 0 and <= 0.5"]
  assert losses.hyperparameter_errors({"simpo_gamma": 0.0, "nll_normalization": "batch"}) == []
  assert losses.hyperparameter_errors({"anything": math.inf}) == [
      "anything=inf must be a finite number"]
  # Every ranged name is a hyperparameter of some registered loss.
  import inspect  # pylint: disable=g-import-not-at-top
  taken = {k for reg in (losses.LOSSES, losses.UNPAIRED_LOSSES) for f in reg.values()
           for k in inspect.signature(f).parameters}
  assert set(losses.HYPERPARAMETER_RANGES) <= taken
