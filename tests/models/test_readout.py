"""`forward_hidden(readout=...)`: the last layer at the read slots only equals the gathered
full forward (values and parameter gradients), for every layer layout it applies to."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefjax import models
from prefjax.models import api

CASES = [
    ("tiny_gemma", {}, True),
    ("tiny_gemma", {"scan_layers": True}, True),
    ("tiny_gemma", {"scan_layers": True, "remat": "full"}, True),
    ("tiny_gemma_mha", {}, True),  # qkv_einsum: queries gathered after the projection
    ("tiny_gemma2", {}, True),  # post-norms, soft-caps, last layer global
    ("tiny_gemma2", {"scan_layers": True}, False),  # last layer inside a scanned pattern
    ("tiny_gemma3", {"scan_layers": True, "num_layers": 7}, True),  # leftover unrolled layer
    ("tiny_gemma3", {"num_layers": 5}, True),  # last layer local (sliding window)
]


def _inputs(cfg):
  toks = jax.random.randint(jax.random.PRNGKey(1), (3, 12), 3, cfg.vocab_size)
  seg = jnp.array([[1] * 12, [1] * 8 + [0] * 4, [1] * 5 + [2] * 7])
  readout = jnp.array([[11, 3], [7, 0], [4, 11]])
  return toks, seg, readout


@pytest.mark.parametrize("preset,overrides,splits", CASES)
def test_readout_equals_gathered_forward(preset, overrides, splits):
  cfg = models.get_config(preset, num_reward_heads=1, **overrides)
  params = models.init_params(cfg, jax.random.PRNGKey(0))
  assert (api.split_last_layer(cfg, params) is not None) == splits
  toks, seg, readout = _inputs(cfg)

  def full(p):
    h = models.forward_hidden(cfg, p, toks, segment_ids=seg)
    return jnp.take_along_axis(h, readout[..., None], axis=1)

  def fast(p):
    return models.forward_hidden(cfg, p, toks, segment_ids=seg, readout=readout)

  np.testing.assert_allclose(np.asarray(fast(params)), np.asarray(full(params)),
                             rtol=1e-5, atol=1e-5)
  weights = jax.random.normal(jax.random.PRNGKey(2), full(params).shape)
  g_full = jax.grad(lambda p: jnp.sum(full(p) * weights))(params)
  g_fast = jax.grad(lambda p: jnp.sum(fast(p) * weights))(params)
  for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_full)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_readout_saves_the_last_layers_work():
  """XLA's FLOP count of the forward drops by most of one layer's share with `readout`."""
  cfg = models.get_config("tiny_gemma", num_reward_heads=1, num_layers=4)
  params = models.init_params(cfg, jax.random.PRNGKey(0))
  toks = jax.random.randint(jax.random.PRNGKey(1), (4, 64), 3, cfg.vocab_size)
  readout = jnp.full((4, 1), 63, jnp.int32)
  flops = lambda f: jax.jit(f).lower(params).compile().cost_analysis()["flops"]  # noqa: E731
  full = flops(lambda p: models.forward_hidden(cfg, p, toks)[:, -1:])
  fast = flops(lambda p: models.forward_hidden(cfg, p, toks, readout=readout))
  assert fast < full * (1 - 0.5 / cfg.num_layers), (fast, full)
