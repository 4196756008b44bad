"""Tests for prefjax.ops.masked against NumPy and plain Python loops."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefjax import ops


def _data(shape=(3, 7), seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=shape).astype(np.float32)
  mask = rng.random(shape) < 0.6
  return x, mask


def test_masked_sum_and_mean_bool_mask():
  x, mask = _data()
  mask[1] = False  # an all-padding row
  np.testing.assert_allclose(ops.masked_sum(x, mask), (x * mask).sum(-1), rtol=1e-6, atol=1e-6)
  mean = ops.masked_mean(x, mask)
  ref = [(x[i][mask[i]].mean() if mask[i].any() else 0.0) for i in range(x.shape[0])]
  np.testing.assert_allclose(mean, ref, rtol=1e-6, atol=1e-6)
  assert mean[1] == 0.0


def test_masked_reductions_float_weights_and_axis():
  x, _ = _data((4, 5, 6))
  wts = np.random.default_rng(1).random((4, 5, 6)).astype(np.float32)
  wts[wts < 0.3] = 0.0
  np.testing.assert_allclose(ops.masked_sum(x, wts, axis=1), (x * wts).sum(1), rtol=1e-5)
  np.testing.assert_allclose(ops.masked_mean(x, wts, axis=(1, 2)),
                             (x * wts).sum((1, 2)) / wts.sum((1, 2)), rtol=1e-5)


def test_empty_mask_mean_is_zero_with_zero_grad():
  x = jnp.arange(6.0).reshape(2, 3)
  mask = jnp.zeros((2, 3), bool)
  assert np.all(ops.masked_mean(x, mask) == 0.0)
  g = jax.grad(lambda x: ops.masked_mean(x, mask).sum())(x)
  assert np.all(np.isfinite(g)) and np.all(g == 0)


def test_masked_positions_do_not_leak_inf_or_nan():
  x = jnp.array([[1.0, -jnp.inf, jnp.nan, 2.0]])
  mask = jnp.array([[True, False, False, True]])
  assert ops.masked_sum(x, mask)[0] == 3.0
  assert ops.masked_mean(x, mask.astype(jnp.float32))[0] == 1.5
  g = jax.grad(lambda x: ops.masked_mean(x, mask).sum())(x)
  np.testing.assert_array_equal(g, [[0.5, 0.0, 0.0, 0.5]])


def test_bf16_is_accumulated_in_f32():
  x = jnp.full((1, 4096), 1.0, jnp.bfloat16)  # bf16 accumulation would stall at 256
  mask = jnp.ones((1, 4096), bool)
  out = ops.masked_sum(x, mask)
  assert out.dtype == jnp.float32 and out[0] == 4096.0


def test_sequence_logps():
  x, mask = _data((5, 9), seed=3)
  mask[2] = False
  sums, counts = ops.sequence_logps(jnp.asarray(x), jnp.asarray(mask))
  np.testing.assert_allclose(sums, [x[i][mask[i]].sum() for i in range(5)], rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(counts, mask.sum(-1))
  assert sums.shape == counts.shape == (5,)
  with pytest.raises(ValueError):
    ops.sequence_logps(jnp.zeros((2, 3)), jnp.ones((2, 4)))


def test_segment_logps_matches_python_loop():
  rng = np.random.default_rng(4)
  r, t, s = 3, 20, 4
  lp = rng.normal(size=(r, t)).astype(np.float32)
  mask = rng.random((r, t)) < 0.8
  seg = np.zeros((r, t), np.int32)
  for i in range(r):  # packed rows: runs of increasing ids, then padding (0)
    cuts = np.sort(rng.choice(np.arange(1, t), size=s, replace=False))
    for j, (lo, hi) in enumerate(zip(np.r_[0, cuts[:-1]], cuts)):
      seg[i, lo:hi] = j + 1
  seg[0, -3:] = s + 1   # out-of-range id: dropped
  lp[1, seg[1] == 0] = np.nan  # padding may hold garbage
  sums, counts = ops.segment_logps(jnp.asarray(lp), jnp.asarray(mask), jnp.asarray(seg), s)
  assert sums.shape == counts.shape == (r, s)
  ref_s, ref_c = np.zeros((r, s)), np.zeros((r, s))
  for i in range(r):
    for j in range(t):
      if mask[i, j] and 1 <= seg[i, j] <= s:
        ref_s[i, seg[i, j] - 1] += lp[i, j]
        ref_c[i, seg[i, j] - 1] += 1
  np.testing.assert_allclose(sums, ref_s, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(counts, ref_c)


def test_segment_logps_agrees_with_sequence_logps_on_unpacked_rows():
  x, mask = _data((4, 8), seed=5)
  sums, counts = ops.sequence_logps(x, mask)
  seg_sums, seg_counts = ops.segment_logps(x, mask, np.ones((4, 8), np.int32), 1)
  np.testing.assert_allclose(seg_sums[:, 0], sums, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(seg_counts[:, 0], counts)
