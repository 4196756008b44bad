"""Tests for prefjax.ops.logprobs against full-logits references (NumPy and plain JAX)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefjax import ops


def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_token_logps(h, w, t, cap=None):
  """float64 NumPy reference: full logits -> (softcap) -> log_softmax -> gather."""
  z = np.asarray(h, np.float64) @ np.asarray(w, np.float64).T
  if cap is not None:
    z = cap * np.tanh(z / cap)
  return np.take_along_axis(_np_log_softmax(z), np.asarray(t)[..., None], -1)[..., 0]


def _naive_jax(h, w, t, cap=None):
  """Independent JAX reference: materialises [B, T, V] logits, autodiff does the rest."""
  z = jnp.einsum("btd,vd->btv", h.astype(jnp.float32), w.astype(jnp.float32),
                 precision=jax.lax.Precision.HIGHEST)
  if cap is not None:
    z = cap * jnp.tanh(z / cap)
  return jnp.take_along_axis(jax.nn.log_softmax(z, -1), t[..., None], -1)[..., 0]


def _inputs(b=2, t=13, d=8, v=50, seed=0, dtype=jnp.float32, scale=1.0):
  """hidden [B, T, D], unembedding [V, D], targets [B, T], mask [B, T], weights [B, T]."""
  rng = np.random.default_rng(seed)
  h = jnp.asarray(scale * rng.normal(size=(b, t, d)), dtype)
  w = jnp.asarray(rng.normal(size=(v, d)), dtype)
  y = jnp.asarray(rng.integers(0, v, size=(b, t)), jnp.int32)
  mask = jnp.asarray(rng.random((b, t)) < 0.7)
  g = jnp.asarray(rng.normal(size=(b, t)), jnp.float32)
  return h, w, y, mask, g


def _loss(fn, h, w, y, mask, g):
  """A masked, randomly weighted sum, like a DPO loss over padded responses."""
  return jnp.sum(jnp.where(mask, fn(h, w, y) * g, 0.0))


def test_from_logits_matches_numpy_with_leading_dims():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(4.0 * rng.normal(size=(2, 3, 7, 11)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 11, size=(2, 3, 7)), jnp.int32)
  out = ops.token_logps_from_logits(logits, y)
  assert out.shape == (2, 3, 7) and out.dtype == jnp.float32
  ref = np.take_along_axis(_np_log_softmax(np.asarray(logits, np.float64)),
                           np.asarray(y)[..., None], -1)[..., 0]
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_from_logits_bf16_is_computed_in_f32():
  rng = np.random.default_rng(2)
  logits = jnp.asarray(8.0 * rng.normal(size=(3, 5, 300)), jnp.bfloat16)
  y = jnp.asarray(rng.integers(0, 300, size=(3, 5)), jnp.int32)
  out = ops.token_logps_from_logits(logits, y)
  assert out.dtype == jnp.float32
  # Reference on the exact bf16 values, in float64: only f32 rounding may differ.
  ref = np.take_along_axis(_np_log_softmax(np.asarray(logits.astype(jnp.float32), np.float64)),
                           np.asarray(y)[..., None], -1)[..., 0]
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_from_logits_rejects_bad_targets_shape():
  with pytest.raises(ValueError, match="targets shape"):
    ops.token_logps_from_logits(jnp.zeros((2, 3, 5)), jnp.zeros((2, 4), jnp.int32))


# (implementation, softcap, T, chunk_size, vocab_chunk_size): T divisible or not by
# the chunk, chunk longer than T, several vocab blocks with a shorter last one,
# exactly divisible blocks, a single block.
CASES = [
    ("custom_vjp", None, 13, 4, 16),
    ("custom_vjp", 2.5, 13, 4, 16),
    ("custom_vjp", 2.5, 12, 4, 10),
    ("custom_vjp", None, 5, 128, 64),
    ("checkpoint", None, 13, 4, None),
    ("checkpoint", 2.5, 12, 4, None),
    ("saved_logits", None, 13, 4, None),
    ("saved_logits", 2.5, 13, 4, None),
    ("saved_logits", None, 5, 128, None),
    # 40 chunks of 1 asked for: lengthened to 14 chunks of 3 (SAVED_LOGITS_MAX_CHUNKS).
    ("saved_logits", 2.5, 40, 1, None),
]


@pytest.mark.parametrize("impl,cap,t,chunk,vchunk", CASES)
def test_from_hidden_values_and_grads_match_reference(impl, cap, t, chunk, vchunk):
  h, w, y, mask, g = _inputs(t=t, scale=1.5)
  kw = {"vocab_chunk_size": vchunk} if vchunk else {}
  chunked = functools.partial(ops.token_logps_from_hidden, chunk_size=chunk, logit_softcap=cap,
                              implementation=impl, **kw)

  @jax.jit
  def run(h, w):
    out = chunked(h, w, y)
    grads = jax.grad(lambda h, w: _loss(chunked, h, w, y, mask, g), argnums=(0, 1))(h, w)
    ref_grads = jax.grad(lambda h, w: _loss(functools.partial(_naive_jax, cap=cap),
                                            h, w, y, mask, g), argnums=(0, 1))(h, w)
    return out, grads, ref_grads

  out, (dh, dw), (dh_ref, dw_ref) = run(h, w)
  assert out.shape == y.shape and out.dtype == jnp.float32
  np.testing.assert_allclose(out, _np_token_logps(h, w, y, cap), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dh, dh_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, dw_ref, rtol=1e-5, atol=1e-5)
  # Padded positions (mask 0) get exactly zero gradient.
  assert np.all(np.asarray(dh)[~np.asarray(mask)] == 0)


def _value_and_grads(fn, h, w, y, mask, g):
  """Jitted (log-probs, (d hidden, d unembedding)) of the masked weighted loss."""
  @jax.jit
  def run(h, w):
    return fn(h, w, y), jax.grad(lambda h, w: _loss(fn, h, w, y, mask, g), argnums=(0, 1))(h, w)
  return run(h, w)


def test_leading_dims_and_extreme_logits():
  # [B, 2, T, D] (chosen / rejected) is flattened internally and restored; logits
  # of size ~1e3 would overflow a naive exp() but not the log-softmax.
  h, w, y, mask, g = _inputs(b=4, t=6, scale=200.0)
  h4, y4, m4, g4 = (a.reshape((2, 2) + a.shape[1:]) for a in (h, y, mask, g))
  fn = functools.partial(ops.token_logps_from_hidden, chunk_size=4, vocab_chunk_size=16)
  out, (dh, dw) = _value_and_grads(fn, h4, w, y4, m4, g4)
  assert out.shape == (2, 2, 6) and dh.shape == h4.shape
  assert np.all(np.isfinite(out)) and np.all(np.asarray(out) <= 0)
  np.testing.assert_allclose(out.reshape(4, 6), _np_token_logps(h, w, y), rtol=1e-5, atol=1e-2)
  assert np.all(np.isfinite(dh)) and np.all(np.isfinite(dw))


def test_from_hidden_bf16_inputs():
  cap = 2.5
  h, w, y, mask, g = _inputs(t=10, d=16, v=40, scale=1.5)
  hb, wb = h.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  fn = functools.partial(ops.token_logps_from_hidden, chunk_size=4, logit_softcap=cap,
                         vocab_chunk_size=16)
  out, (dh, dw) = _value_and_grads(fn, hb, wb, y, mask, g)
  assert out.dtype == jnp.float32
  assert dh.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
  # f32 accumulation of exact bf16 products: matches float64 on the bf16 values closely.
  hf, wf = hb.astype(jnp.float32), wb.astype(jnp.float32)
  np.testing.assert_allclose(out, _np_token_logps(hf, wf, y, cap), rtol=1e-4, atol=1e-4)
  # And stays close to the f32 computation on the unrounded inputs.
  np.testing.assert_allclose(out, _np_token_logps(h, w, y, cap), rtol=0.1, atol=0.1)
  _, (dh_ref, dw_ref) = _value_and_grads(functools.partial(_naive_jax, cap=cap),
                                         hf, wf, y, mask, g)
  scale_h, scale_w = np.abs(dh_ref).max(), np.abs(dw_ref).max()
  np.testing.assert_allclose(dh.astype(jnp.float32), dh_ref, atol=0.02 * scale_h)
  np.testing.assert_allclose(dw.astype(jnp.float32), dw_ref, atol=0.02 * scale_w)


def test_compute_dtype_bf16_on_f32_inputs():
  h, w, y, mask, g = _inputs(t=9)
  fn = functools.partial(ops.token_logps_from_hidden, chunk_size=4, compute_dtype=jnp.bfloat16)
  out, (dh, dw) = _value_and_grads(fn, h, w, y, mask, g)
  ref = _np_token_logps(h.astype(jnp.bfloat16).astype(jnp.float32),
                        w.astype(jnp.bfloat16).astype(jnp.float32), y)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
  assert dh.dtype == jnp.float32 and dw.dtype == jnp.float32


def test_from_hidden_never_materialises_full_logits():
  # Compile-time memory (deterministic, not timed): value_and_grad of the chunked
  # head must need far less scratch than one float32 [B, T, V] logits array.
  b, t, d, v = 2, 256, 16, 4096
  h = jax.ShapeDtypeStruct((b, t, d), jnp.float32)
  w = jax.ShapeDtypeStruct((v, d), jnp.float32)
  y = jax.ShapeDtypeStruct((b, t), jnp.int32)
  fn = jax.value_and_grad(lambda h, w, y: ops.token_logps_from_hidden(
      h, w, y, chunk_size=32, vocab_chunk_size=1024).sum(), argnums=(0, 1))
  temp = jax.jit(fn).lower(h, w, y).compile().memory_analysis().temp_size_in_bytes
  logits_bytes = b * t * v * 4
  assert temp < logits_bytes / 4, (temp, logits_bytes)


def test_sharded_batch_matches_single_device():
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  devices = np.array(jax.devices())
  mesh = Mesh(devices, ("data",))
  h, w, y, mask, g = _inputs(b=len(devices), t=6)
  fn = jax.value_and_grad(lambda h, w: _loss(functools.partial(
      ops.token_logps_from_hidden, chunk_size=4, vocab_chunk_size=16), h, w, y, mask, g),
      argnums=(0, 1))
  ref = jax.jit(fn)(h, w)
  hs = jax.device_put(h, NamedSharding(mesh, P("data")))
  out = jax.jit(fn)(hs, w)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bad_arguments():
  h, w, y, _, _ = _inputs(t=6)
  with pytest.raises(ValueError, match="unembedding"):
    ops.token_logps_from_hidden(h, w[:, :3], y)
  with pytest.raises(ValueError, match="targets shape"):
    ops.token_logps_from_hidden(h, w, y[:, :3])
  with pytest.raises(ValueError, match="chunk_size"):
    ops.token_logps_from_hidden(h, w, y, chunk_size=0)
  with pytest.raises(ValueError, match="implementation"):
    ops.token_logps_from_hidden(h, w, y, implementation="nope")


@pytest.mark.parametrize("implementation", ["custom_vjp", "checkpoint", "saved_logits"])
@pytest.mark.parametrize("chunk,groups,cap", [(4, 1, None), (5, 2, None), (3, 4, 2.0),
                                              (64, 1, None)])
def test_where_compacted_matches_naive(implementation, chunk, groups, cap):
  """Only `where` positions are computed: equal values there, 0 elsewhere, equal gradients."""
  h, w, y, _, g = _inputs(b=4, t=9, d=8, v=37, seed=3)
  rng = np.random.default_rng(4)
  where = jnp.asarray(rng.random((4, 9)) < 0.4).at[1].set(False)  # one row with nothing
  fn = functools.partial(ops.token_logps_from_hidden, chunk_size=chunk, logit_softcap=cap,
                         vocab_chunk_size=16, implementation=implementation, where=where,
                         where_groups=groups)
  out = jax.jit(lambda h, w: fn(h, w, y))(h, w)
  ref = _np_token_logps(h, w, y, cap)
  np.testing.assert_allclose(out, np.where(where, ref, 0.0), rtol=2e-5, atol=2e-5)
  loss = lambda f: lambda h, w: jnp.sum(f(h, w, y) * g)  # noqa: E731
  got = jax.jit(jax.grad(loss(fn), argnums=(0, 1)))(h, w)
  naive = lambda h, w, y: jnp.where(where, _naive_jax(h, w, y, cap), 0.0)  # noqa: E731
  want = jax.grad(loss(naive), argnums=(0, 1))(h, w)
  for a, e in zip(got, want):
    np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-5)


def test_where_skips_chunks_past_the_last_needed_position():
  """With 3 needed positions and chunks of 2, chunks 2.. are skipped: a NaN hidden state
  there cannot leak into values or gradients (an inactive chunk is never computed)."""
  h, w, y, _, g = _inputs(b=2, t=6, d=4, v=11, seed=5)
  where = jnp.zeros((2, 6), bool).at[0, 1].set(True).at[1, 4:].set(True)
  h = h.at[0, 5].set(jnp.nan)  # sorted to the end of the compacted rows
  for impl in ("custom_vjp", "saved_logits"):
    fn = lambda h, w: ops.token_logps_from_hidden(h, w, y, chunk_size=2, where=where,  # noqa: E731
                                                  implementation=impl)
    out = fn(h, w)
    assert np.isfinite(np.asarray(out)).all()
    dh, dw = jax.grad(lambda h, w: jnp.sum(fn(h, w) * g), argnums=(0, 1))(h, w)
    assert np.isfinite(np.asarray(dw)).all() and np.isfinite(np.asarray(dh)[where]).all()


def test_where_errors():
  h, w, y, _, _ = _inputs(b=3, t=5)
  with pytest.raises(ValueError, match="where shape"):
    ops.token_logps_from_hidden(h, w, y, where=jnp.ones((3, 4), bool))
  with pytest.raises(ValueError, match="where_groups=2"):
    ops.token_logps_from_hidden(h, w, y, where=jnp.ones((3, 5), bool), where_groups=2)


def _count_dots(jaxpr) -> int:
  """dot_general equations in a jaxpr and every sub-jaxpr (scan / cond / custom_vjp bodies)."""
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name == "dot_general"
    for v in eqn.params.values():
      for sub in (v if isinstance(v, (tuple, list)) else (v,)):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          n += _count_dots(inner)
  return n


def test_saved_logits_does_one_matmul_fewer():
  """value_and_grad traces 3 LM-head matmuls with "saved_logits", 4 with "custom_vjp"
  (forward, recomputed logits, d hidden, d unembedding) for one chunk."""
  h, w, y, mask, g = _inputs(b=2, t=64, d=32, v=512, seed=6)

  def dots(impl):
    fn = functools.partial(ops.token_logps_from_hidden, chunk_size=64, implementation=impl,
                           vocab_chunk_size=512)
    return _count_dots(jax.make_jaxpr(jax.grad(lambda h, w: _loss(fn, h, w, y, mask, g),
                                               argnums=(0, 1)))(h, w).jaxpr)

  assert (dots("saved_logits"), dots("custom_vjp")) == (3, 4)
