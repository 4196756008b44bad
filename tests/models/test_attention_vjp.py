"""The hand-written attention backward equals autodiff of the plain softmax attention."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefjax.models.layers import attend, attend_reference


@pytest.mark.parametrize("softcap,dtype", [(None, jnp.float32), (3.0, jnp.float32),
                                           (None, jnp.bfloat16)])
def test_attend_vjp_matches_autodiff(softcap, dtype):
  b, t, s, k, g, h = 2, 7, 9, 2, 3, 8
  ks = jax.random.split(jax.random.PRNGKey(0), 4)
  q = (2 * jax.random.normal(ks[0], (b, t, k, g, h))).astype(dtype)
  key = jax.random.normal(ks[1], (b, s, k, h)).astype(dtype)
  val = jax.random.normal(ks[2], (b, s, k, h)).astype(dtype)
  r = jax.random.normal(ks[3], (b, t, k, g, h))
  mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, s), bool), k=2), (b, t, s))
  mask = mask.at[1, :, :4].set(False).at[0, 3].set(False)  # padded keys; one query sees nothing

  def loss(fn):
    return lambda q, key, val: jnp.sum(fn(q, key, val, mask, softcap).astype(jnp.float32) * r)

  v0, g0 = jax.value_and_grad(loss(attend_reference), argnums=(0, 1, 2))(q, key, val)
  v1, g1 = jax.jit(jax.value_and_grad(loss(attend), argnums=(0, 1, 2)))(q, key, val)
  tol = 1e-5 if dtype == jnp.float32 else 3e-2
  np.testing.assert_allclose(v1, v0, rtol=tol, atol=tol)
  for a, e in zip(g1, g0):
    assert a.dtype == dtype
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(e, np.float32),
                               rtol=tol * 10, atol=tol * 10)
