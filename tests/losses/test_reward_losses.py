"""Reward-model losses vs NumPy references (BT, margin, centering, K-wise, transforms)."""
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from prefjax import losses as L

# One compile per call shape: cheaper than op-by-op dispatch of many primitives.
kwise = jax.jit(L.kwise_ranking, static_argnames="lower_is_better")


def _ls(x):
  return -np.logaddexp(0.0, -x)


def test_bradley_terry_and_margin():
  rng = np.random.default_rng(0)
  c, r, m = (rng.normal(size=8).astype(np.float32) for _ in range(3))
  np.testing.assert_allclose(L.bradley_terry(c, r), -_ls(c.astype(np.float64) - r), rtol=1e-6)
  np.testing.assert_allclose(L.bradley_terry(c, r, margin=m), -_ls(c.astype(np.float64) - r - m), rtol=1e-6)
  np.testing.assert_allclose(L.bradley_terry(c, c), math.log(2), rtol=1e-6)
  out16 = L.bradley_terry(jnp.asarray(c, jnp.bfloat16), jnp.asarray(r, jnp.bfloat16))
  assert out16.dtype == jnp.float32 and out16.shape == (8,)
  np.testing.assert_allclose(out16, L.bradley_terry(c, r), atol=0.02)
  gc, gr = jax.grad(lambda a, b: jnp.sum(L.bradley_terry(a, b)), argnums=(0, 1))(c, r)
  assert np.all(gc < 0) and np.all(gr > 0)
  np.testing.assert_allclose(jax.jit(L.bradley_terry)(c, r, m), L.bradley_terry(c, r, m), rtol=1e-6)


def test_reward_model_loss_with_centering():
  rng = np.random.default_rng(1)
  c, r, m = (rng.normal(size=8) for _ in range(3))
  got = L.reward_model_loss(c, r, margin=m, center_rewards_coefficient=0.01)
  np.testing.assert_allclose(got, -_ls(c - r - m) + 0.01 * (c + r) ** 2, rtol=1e-5)
  np.testing.assert_allclose(L.reward_model_loss(c, r), -_ls(c - r), rtol=1e-5)


def np_kwise(scores, targets, mask):
  out = []
  for s, t, m in zip(scores, targets, mask):
    idx = [i for i in range(len(s)) if m[i]]
    k = len(idx)
    total = 0.0
    for i, j in itertools.combinations(idx, 2):
      if t[i] == t[j]:
        continue
      w, l = (i, j) if t[i] > t[j] else (j, i)
      total += -_ls(s[w] - s[l])
    out.append(total / math.comb(k, 2) if k >= 2 else 0.0)
  return np.array(out)


def test_kwise_ranking_ragged():
  rng = np.random.default_rng(2)
  s = rng.normal(size=(5, 4))
  t = rng.permutation(np.tile(np.arange(4.0), (5, 1)).T).T
  t[4, 1] = t[4, 2]  # a tie
  mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
  np.testing.assert_allclose(kwise(s, t, mask), np_kwise(s, t, mask), rtol=1e-5, atol=1e-7)
  # Ranks (0 = best) give the same as negated target scores.
  np.testing.assert_allclose(kwise(s, -t, mask, lower_is_better=True),
                             kwise(s, t, mask), rtol=1e-6)
  # K = 2 is Bradley-Terry.
  two = kwise(s[:, :2], np.array([[1.0, 0.0]] * 5))
  np.testing.assert_allclose(two, L.bradley_terry(s[:, 0], s[:, 1]), rtol=1e-6)
  assert float(kwise(s, t, mask)[3]) == 0.0  # K = 1: no pairs, no NaN


def test_transformed_and_combined_rewards():
  rng = np.random.default_rng(3)
  r, ref = rng.normal(size=(6, 3)), rng.normal(size=(3,))
  w = np.array([1.0, 0.5, 2.0])
  np.testing.assert_allclose(L.log_sigmoid_transform(r, ref), _ls(r - ref), rtol=1e-6)
  np.testing.assert_allclose(L.combine_transformed_rewards(r, ref), _ls(r - ref).sum(-1), rtol=1e-5)
  np.testing.assert_allclose(L.combine_transformed_rewards(r, ref, w), (_ls(r - ref) * w).sum(-1), rtol=1e-5)
  heads_c, heads_r = rng.normal(size=(6, 3)), rng.normal(size=(6, 3))
  np.testing.assert_allclose(L.combine_heads(heads_c, w), heads_c @ w, rtol=1e-5)
  np.testing.assert_allclose(L.multi_head_bradley_terry(heads_c, heads_r), -_ls(heads_c - heads_r), rtol=1e-5)
