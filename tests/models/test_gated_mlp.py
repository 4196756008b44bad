"""gated_mlp's hand-written backward equals autodiff of the plain GLU formula."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefjax.models.gated_mlp import gated_mlp, gated_mlp_reference


@pytest.mark.parametrize("activation", ["gelu", "silu"])
@pytest.mark.parametrize("transposed", [False, True])
def test_value_and_grads_match_autodiff(activation, transposed):
  b, t, d, f = 2, 5, 8, 12
  k = jax.random.split(jax.random.PRNGKey(0), 4)
  x = jax.random.normal(k[0], (b, t, d))
  w_gate = jax.random.normal(k[1], (2, f, d) if transposed else (2, d, f)) * 0.3
  w_out = jax.random.normal(k[2], (f, d)) * 0.3
  r = jax.random.normal(k[3], (b, t, d))

  def loss(fn):
    return lambda *p: jnp.sum(fn(*p, activation, transposed) * r)

  want_v, want_g = jax.value_and_grad(loss(gated_mlp_reference), argnums=(0, 1, 2))(
      x, w_gate, w_out)
  got_v, got_g = jax.jit(jax.value_and_grad(loss(gated_mlp), argnums=(0, 1, 2)))(
      x, w_gate, w_out)
  np.testing.assert_allclose(got_v, want_v, rtol=1e-5)
  for got, want in zip(got_g, want_g):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_bfloat16_grads_keep_dtypes():
  x = jnp.ones((1, 3, 4), jnp.bfloat16)
  w_gate = jnp.full((2, 4, 6), 0.1, jnp.bfloat16)
  w_out = jnp.full((6, 4), 0.1, jnp.bfloat16)
  g = jax.grad(lambda *p: gated_mlp(*p).astype(jnp.float32).sum(), argnums=(0, 1, 2))(
      x, w_gate, w_out)
  assert [a.dtype for a in g] == [jnp.bfloat16] * 3
  want = jax.grad(lambda *p: gated_mlp_reference(*p).astype(jnp.float32).sum(),
                  argnums=(0, 1, 2))(x, w_gate, w_out)
  for a, b in zip(g, want):
    np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=2e-2)
