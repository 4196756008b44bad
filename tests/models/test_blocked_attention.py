"""Query-blocked attention equals plain attention (values and gradients), incl. ragged T."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefjax import models
from prefjax.models.layers import attend, blocked_attention


@pytest.mark.parametrize("t,block,softcap", [(12, 4, None), (11, 4, None), (9, 4, 5.0)])
def test_blocked_equals_plain(t, block, softcap):
  b, s, k, g, h = 2, t, 2, 3, 8
  ks = jax.random.split(jax.random.PRNGKey(0), 4)
  q = jax.random.normal(ks[0], (b, t, k, g, h))
  key = jax.random.normal(ks[1], (b, s, k, h))
  val = jax.random.normal(ks[2], (b, s, k, h))
  causal = jnp.tril(jnp.ones((t, s), bool))
  mask = jnp.broadcast_to(causal, (b, t, s)).at[1, :, : 3].set(False)  # some keys padded
  r = jax.random.normal(ks[3], (b, t, k, g, h))

  def loss(fn):
    return lambda q, key, val: jnp.sum(fn(q, key, val) * r)

  plain = lambda q, key, val: attend(q, key, val, mask, softcap)
  blocked = lambda q, key, val: blocked_attention(q, key, val, mask, softcap, block)
  v0, g0 = jax.value_and_grad(loss(plain), argnums=(0, 1, 2))(q, key, val)
  v1, g1 = jax.jit(jax.value_and_grad(loss(blocked), argnums=(0, 1, 2)))(q, key, val)
  np.testing.assert_allclose(v1, v0, rtol=1e-5)
  for a, e in zip(g1, g0):
    np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-5)


def test_model_logits_unchanged_by_query_block():
  cfg = models.get_config("tiny_gemma")
  params = models.init_params(cfg, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 10), 3, cfg.vocab_size)
  seg = jnp.ones((2, 10), jnp.int32).at[1, 7:].set(0)
  want = models.forward(cfg, params, tokens, segment_ids=seg)
  got = models.forward(cfg.replace(attention_query_block=3), params, tokens, segment_ids=seg)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got[1, :7], want[1, :7], rtol=1e-5, atol=1e-5)
