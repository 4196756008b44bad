"""Query-blocked and causal-blocked attention equal plain attention (values and gradients)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefjax import models
from prefjax.models import Kernels
from prefjax.models.layers import attend, blocked_attention, causal_blocked_attention

# The independent reference: every query attends over the whole row under the mask.
PLAIN = Kernels(attention="xla", attention_query_block=0, attention_causal_block=0)


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

  plain = lambda q, key, val: attend(q, key, val, mask, softcap)
  blocked = lambda q, key, val: blocked_attention(q, key, val, mask, softcap, block)
  _assert_same_value_and_grads(plain, blocked, (q, key, val), r)


def _assert_same_value_and_grads(plain, blocked, args, r):
  """sum(fn(*args) * r) and its gradients w.r.t. all args agree (blocked one jitted)."""
  loss = lambda fn: lambda *a: jnp.sum(fn(*a) * r)  # noqa: E731
  argnums = tuple(range(len(args)))
  v0, g0 = jax.value_and_grad(loss(plain), argnums=argnums)(*args)
  v1, g1 = jax.jit(jax.value_and_grad(loss(blocked), argnums=argnums))(*args)
  np.testing.assert_allclose(v1, v0, rtol=1e-5)
  for a, e in zip(g1, g0):
    np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-5)


def test_model_logits_unchanged_by_query_block():
  cfg = models.get_config("tiny_gemma")
  params = models.init_params(cfg, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 10), 3, cfg.vocab_size)
  seg = jnp.ones((2, 10), jnp.int32).at[1, 7:].set(0)
  want = models.forward(cfg, params, tokens, segment_ids=seg, kernels=PLAIN)
  got = models.forward(cfg, params, tokens, segment_ids=seg,
                       kernels=PLAIN.replace(attention_query_block=3))
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got[1, :7], want[1, :7], rtol=1e-5, atol=1e-5)


def _packed_causal_mask(b, t):
  """Causal mask with two packed segments in row 0 and trailing padding in row 1."""
  seg = np.ones((b, t), np.int32)
  seg[0, t // 2:] = 2
  seg[1, t - 3:] = 0
  seg = jnp.asarray(seg)
  idx = jnp.arange(t)
  mask = (idx[None, None, :] <= idx[None, :, None]) & (seg[:, :, None] == seg[:, None, :])
  return mask & (seg != 0)[:, None, :], seg


@pytest.mark.parametrize("t,block,remat_block,softcap", [
    (12, 4, 0, None), (11, 4, 0, None), (13, 4, 6, 5.0), (16, 5, 8, None), (9, 32, 0, None),
    (10, 3, 4, 5.0)])
def test_causal_blocked_equals_plain(t, block, remat_block, softcap):
  """Causal block skipping is exact at every real query row, for values and all gradients.

  Padding query rows (no key allowed) are excluded: plain attention averages all S values
  there, the blocked form the values up to the block's end; no real row ever reads them.
  """
  b, k, g, h = 2, 2, 3, 8
  ks = jax.random.split(jax.random.PRNGKey(1), 4)
  q = jax.random.normal(ks[0], (b, t, k, g, h))
  key = jax.random.normal(ks[1], (b, t, k, h))
  val = jax.random.normal(ks[2], (b, t, k, h))
  mask, seg = _packed_causal_mask(b, t)
  r = jax.random.normal(ks[3], (b, t, k, g, h)) * (seg != 0)[:, :, None, None, None]

  plain = lambda q, key, val: attend(q, key, val, mask, softcap)
  blocked = lambda q, key, val: causal_blocked_attention(q, key, val, mask, softcap, block,
                                                         remat_block)
  _assert_same_value_and_grads(plain, blocked, (q, key, val), r)


def test_causal_blocked_skips_score_work():
  """The compiled forward does (n + 1) / (2n) of plain attention's score FLOPs (n blocks)."""
  b, t, k, g, h = 1, 64, 1, 4, 16
  q = jnp.ones((b, t, k, g, h))
  kv = jnp.ones((b, t, k, h))
  mask, _ = _packed_causal_mask(2, t)
  mask = mask[:1]

  def flops(fn):
    return jax.jit(fn).lower(q, kv, kv).compile().cost_analysis()["flops"]

  plain = flops(lambda q, key, val: attend(q, key, val, mask, None))
  blocked = flops(lambda q, key, val: causal_blocked_attention(q, key, val, mask, None, 16))
  # Matmul work: 4 blocks see 16, 32, 48, 64 keys -> 160 / 256 of the plain score columns.
  assert blocked < 0.7 * plain, (blocked, plain)


@pytest.mark.parametrize("preset,scan", [("tiny_gemma", True), ("tiny_gemma2", False)])
def test_model_unchanged_by_causal_block(preset, scan):
  """Logits and parameter gradients at real tokens do not depend on the kernels' causal and
  query blocks (packed segments, padding, MQA / GQA, Gemma 2 soft-capping and local layers,
  scanned layers)."""
  cfg = models.get_config(preset, scan_layers=scan)
  params = models.init_params(cfg, jax.random.PRNGKey(0))
  t = 13
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, t), 3, cfg.vocab_size)
  seg = np.ones((2, t), np.int32)
  seg[0, 6:] = 2
  seg[1, 10:] = 0
  seg = jnp.asarray(seg)
  real = (seg != 0)[..., None]

  def loss(kernels):
    def f(p):
      logits = models.forward(cfg, p, tokens, segment_ids=seg, kernels=kernels)
      return jnp.sum(jax.nn.log_softmax(logits)[..., 7] * real[..., 0]), logits
    return jax.jit(jax.value_and_grad(f, has_aux=True))

  (l0, logits0), g0 = loss(PLAIN)(params)
  for block, remat_block in ((4, 0), (3, 8)):
    kernels = Kernels.for_platform("cpu", attention_causal_block=block,
                                   attention_query_block=remat_block)
    (l1, logits1), g1 = loss(kernels)(params)
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    np.testing.assert_allclose(jnp.where(real, logits1, 0), jnp.where(real, logits0, 0),
                               rtol=1e-4, atol=1e-5)
    for a, e in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
      np.testing.assert_allclose(a, e, rtol=1e-3, atol=1e-5)
