"""Shared inputs of the attention-kernel tests."""
import jax


def random_attention_inputs(b, t, k, g, h, seg, seed=0):
  """float32 q [B,T,K,G,H], key/val [B,T,K,H], and a cotangent that is 0 at padding queries
  (segment 0: they see no key and nothing reads them)."""
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(ks[0], (b, t, k, g, h))
  key = jax.random.normal(ks[1], (b, t, k, h))
  val = jax.random.normal(ks[2], (b, t, k, h))
  ct = jax.random.normal(ks[3], (b, t, k, g, h)) * (seg != 0)[:, :, None, None, None]
  return q, key, val, ct
