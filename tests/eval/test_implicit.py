"""prefjax.eval.implicit against the published formulas (numbers worked by hand)."""
import math
import types

import jax
import numpy as np
import pytest

from prefjax.eval import implicit


def _pair(**kw):
  base = dict(chosen=None, rejected=None, ref_chosen=None, ref_rejected=None,
              chosen_lengths=None, rejected_lengths=None)
  base.update({k: np.asarray(v, np.float32) for k, v in kw.items()})
  return types.SimpleNamespace(**base)


def test_dpo_reward_formula():
  # beta * (logpi - logpi_ref): 0.1 * (-10 - -12) = 0.2 ; 0.1 * (-20 - -15) = -0.5
  r = implicit.dpo_reward([-10.0, -20.0], [-12.0, -15.0], beta=0.1)
  np.testing.assert_allclose(r, [0.2, -0.5], rtol=1e-6)


def test_simpo_and_rrhf_length_normalised():
  # beta / |y| * logpi: 2 / 3 * -6 = -4 ; 2 / 4 * -2 = -1 ; length 0 is clamped to 1
  np.testing.assert_allclose(implicit.simpo_reward([-6.0, -2.0, -1.0], [3, 4, 0], beta=2.0),
                             [-4.0, -1.0, -2.0], rtol=1e-6)
  np.testing.assert_allclose(implicit.rrhf_reward([-6.0, -2.0], [3, 4]), [-2.0, -0.5], rtol=1e-6)
  np.testing.assert_allclose(implicit.cpo_reward([-6.0], beta=0.5), [-3.0], rtol=1e-6)


def test_orpo_log_odds():
  # mean log-prob ln(1/2) -> odds 1 -> 0 ; ln(1/4) -> odds 1/3 -> -ln 3
  lp = np.array([2 * math.log(0.5), 3 * math.log(0.25)])
  np.testing.assert_allclose(implicit.orpo_log_odds(lp, [2, 3]), [0.0, -math.log(3.0)],
                             atol=1e-6)
  assert np.isfinite(implicit.orpo_log_odds([0.0], [5])).all()  # p = 1 clamped


def test_implicit_pair_rewards_dispatch_and_errors():
  lp = _pair(chosen=[-4.0], rejected=[-9.0], ref_chosen=[-5.0], ref_rejected=[-6.0],
             chosen_lengths=[2], rejected_lengths=[3])
  c, r = implicit.implicit_pair_rewards("dpo", lp, beta=0.5)
  np.testing.assert_allclose([c[0], r[0]], [0.5, -1.5], rtol=1e-6)
  c, r = implicit.implicit_pair_rewards("simpo", lp, beta=1.0)
  np.testing.assert_allclose([c[0], r[0]], [-2.0, -3.0], rtol=1e-6)
  with pytest.raises(ValueError, match="ref_logps"):
    implicit.implicit_pair_rewards("ipo", _pair(chosen=[-1.0], rejected=[-2.0]))
  with pytest.raises(ValueError, match="no implicit reward"):
    implicit.implicit_reward("nonsense", [-1.0])


def test_jit_and_score_fn():
  f = jax.jit(lambda a, b: implicit.implicit_reward("dpo", a, ref_logps=b, beta=0.1))
  np.testing.assert_allclose(f(np.array([-1.0]), np.array([-3.0])), [0.2], rtol=1e-6)
  fn = implicit.score_fn_from_logps(
      lambda batch: _pair(chosen=batch["c"], rejected=batch["r"], ref_chosen=[0.0, 0.0],
                          ref_rejected=[0.0, 0.0]), "dpo", beta=2.0)
  c, r = fn({"c": [-1.0, -2.0], "r": [-3.0, -1.0]})
  np.testing.assert_allclose(c, [-2.0, -4.0]) and np.testing.assert_allclose(r, [-6.0, -2.0])


def test_matches_losses_module_rewards():
  """Cross-check: our definitions equal `prefjax.losses.get(name)(...).chosen_rewards`."""
  losses = pytest.importorskip("prefjax.losses")
  if not hasattr(losses, "get"):
    pytest.skip("prefjax.losses has no registry yet")
  from prefjax.losses import PairedLogps  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  arr = lambda lo, hi: np.asarray(rng.uniform(lo, hi, size=4), np.float32)
  lp = PairedLogps(chosen=arr(-30, -5), rejected=arr(-30, -5), ref_chosen=arr(-30, -5),
                   ref_rejected=arr(-30, -5), chosen_lengths=np.float32([5, 7, 9, 11]),
                   rejected_lengths=np.float32([6, 8, 10, 3]))
  checked = 0
  for name in losses.names():
    if name not in implicit.METHOD_KIND:
      continue
    ours = implicit.implicit_pair_rewards(name, lp, beta=0.3)
    theirs = implicit.rewards_from_loss(name, lp, beta=0.3)
    if implicit.METHOD_KIND[name] == "orpo":  # losses log λ·mean logp: same ranking
      assert np.array_equal(np.sign(ours[0] - ours[1]), np.sign(theirs[0] - theirs[1]))
    else:
      np.testing.assert_allclose(ours, theirs, rtol=1e-5, err_msg=name)
    checked += 1
  assert checked >= 10
