"""KV-cache sampler: greedy decode equals step-by-step argmax of the full forward."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from prefjax import models
from prefjax.models import sampler

T = 16
O0 = {"xla_backend_optimization_level": 0}
fwd = jax.jit(models.forward, static_argnums=0, compiler_options=O0)
PROMPTS = np.array([[5, 17, 33, 0, 0], [7, 9, 11, 13, 21]], np.int32)
LENGTHS = np.array([3, 5], np.int32)
NEW = 6


@functools.lru_cache(maxsize=None)
def _model():
  cfg = models.get_config("tiny_gemma2")  # GQA, sliding window 4 < sequence, soft-caps
  return cfg, models.init_params(cfg, 0)


def _reference_greedy(cfg, params, prompt, n):
  """Argmax of the full (uncached) forward, one token at a time, at a fixed shape [1, T]."""
  seq = list(prompt)
  for _ in range(n):
    toks = np.zeros((1, T), np.int32)
    toks[0, :len(seq)] = seq
    segs = (np.arange(T) < len(seq)).astype(np.int32)[None]
    logits = fwd(cfg, params, jnp.asarray(toks), segment_ids=jnp.asarray(segs))
    seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
  return seq[len(prompt):]


def test_greedy_equals_full_forward_argmax_and_stop_tokens():
  cfg, params = _model()
  out = models.sample(cfg, params, PROMPTS, LENGTHS, max_new_tokens=NEW)
  assert out.tokens.shape == (2, NEW)
  ref = [_reference_greedy(cfg, params, PROMPTS[b, :LENGTHS[b]], NEW) for b in range(2)]
  np.testing.assert_array_equal(np.asarray(out.tokens), np.array(ref))
  np.testing.assert_array_equal(np.asarray(out.lengths), [NEW, NEW])
  # Stop on row 0's third token: row 0 ends there (stop kept, then padding), row 1 continues
  # unless it meets the same token.
  stop = ref[0][2]
  out2 = models.sample(cfg, params, PROMPTS, LENGTHS, max_new_tokens=NEW, stop_tokens=[stop])
  row0 = np.asarray(out2.tokens[0])
  first = ref[0].index(stop)
  np.testing.assert_array_equal(row0[:first + 1], ref[0][:first + 1])
  assert (row0[first + 1:] == 0).all() and int(out2.lengths[0]) == first + 1
  assert bool(out2.done[0])


def test_sampling_filters():
  logits = np.random.default_rng(0).normal(size=(4, 50)).astype(np.float32)

  @functools.partial(jax.jit, compiler_options=O0)
  def draw(keys):
    pick = lambda k, kk, p: sampler.choose(logits, k, temperature=0.7, top_k=kk, top_p=p)  # noqa: E731
    return jax.vmap(lambda k: pick(k, 1, 0.9))(keys), jax.vmap(lambda k: pick(k, 3, 1.0))(keys)

  top1, draws = draw(jax.random.split(jax.random.key(2), 64))
  np.testing.assert_array_equal(np.asarray(top1), np.tile(np.argmax(logits, -1), (64, 1)))
  top3 = np.argsort(-logits, axis=-1)[:, :3]
  assert all(np.isin(np.asarray(draws)[:, b], top3[b]).all() for b in range(4))
  assert len(np.unique(np.asarray(draws)[:, 0])) > 1  # really stochastic
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  kept = np.isfinite(np.asarray(sampler.filter_logits(logits, temperature=1.0, top_p=0.7)))
  np.testing.assert_array_equal(kept, [[True, True, False, False]])
  kept = np.isfinite(np.asarray(sampler.filter_logits(logits, temperature=1.0, top_k=3)))
  np.testing.assert_array_equal(kept, [[True, True, True, False]])


def test_left_align():
  toks, segs, pos = sampler.left_align(jnp.asarray(PROMPTS), jnp.asarray(LENGTHS))
  np.testing.assert_array_equal(np.asarray(toks[0]), [0, 0, 5, 17, 33])
  np.testing.assert_array_equal(np.asarray(segs[0]), [0, 0, 1, 1, 1])
  np.testing.assert_array_equal(np.asarray(pos[0]), [0, 0, 0, 1, 2])
