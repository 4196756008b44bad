"""Key-window causal flash attention equals plain attention, and skips the keys it should."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefjax import models
from prefjax.models import Kernels
from prefjax.models.layers import attend, attend_reference, batch_is_split
from prefjax.models.transformer import attention_mask
from prefjax.models.window_attention import (window_flash_attention, window_index,
                                             window_widths)
from tests.models.attention_util import random_attention_inputs


def _packed_rows(t: int, lengths: list[list[int]], branches: bool):
  """Segment ids [B, T] (rows of consecutive segments, then padding) and, with `branches`,
  prompt-sharing branch ids (each segment: a shared third, then two branches)."""
  seg = np.zeros((len(lengths), t), np.int32)
  br = np.zeros((len(lengths), t), np.int32)
  for b, row in enumerate(lengths):
    p = 0
    for i, n in enumerate(row):
      seg[b, p:p + n] = i + 1
      third = n // 3
      br[b, p + third:p + 2 * third] = 1
      br[b, p + 2 * third:p + n] = 2
      p += n
  idx = jnp.arange(t)
  seg_j, br_j = jnp.asarray(seg), jnp.asarray(br)
  kw = dict(q_branches=br_j, k_branches=br_j) if branches else {}
  return attention_mask(idx, idx, seg_j, seg_j, **kw), seg


_inputs = random_attention_inputs


CASES = [  # t, lengths per row, branches, block, tile, softcap, (k, g)
    (24, [[5, 9, 7], [24]], False, 4, 4, None, (1, 4)),
    (24, [[6, 6, 6, 6], [11, 10]], True, 8, 4, 5.0, (2, 2)),
    (23, [[3, 13], [2, 2, 2, 9]], True, 6, 5, None, (1, 3)),
    (32, [[32], [17]], False, 8, 8, None, (2, 1)),   # one segment / padding: full windows
]


@pytest.mark.parametrize("t,lengths,branches,block,tile,softcap,kg", CASES)
@pytest.mark.parametrize("per_row", [True, False])
def test_window_attention_equals_autodiff_reference(t, lengths, branches, block, tile,
                                                    softcap, kg, per_row):
  """Values and all three gradients at real query rows, against autodiff of plain attention
  (packed segments, prompt-sharing branches, GQA / MQA / MHA, soft-capping, padding, T not a
  multiple of the block or the tile)."""
  mask, seg = _packed_rows(t, lengths, branches)
  k, g = kg
  q, key, val, r = _inputs(len(lengths), t, k, g, 8, seg)
  real = jnp.asarray(seg != 0)[:, :, None, None, None]

  def loss(fn):
    return lambda q, key, val: jnp.sum(jnp.where(real, fn(q, key, val), 0.0) * r)

  ref = jax.value_and_grad(loss(lambda q, key, val: attend_reference(q, key, val, mask, softcap)),
                           argnums=(0, 1, 2))(q, key, val)
  win = jax.jit(jax.value_and_grad(loss(lambda q, key, val: window_flash_attention(
      q, key, val, mask, softcap, block, tile, 0, per_row)), argnums=(0, 1, 2)))(q, key, val)
  np.testing.assert_allclose(win[0], ref[0], rtol=1e-5)
  for a, e in zip(win[1], ref[1]):
    np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-5)


def test_window_attention_with_query_offset():
  """Queries of slots offset .. offset + T - 1 against keys 0 .. S - 1 (a query group)."""
  s, off = 24, 10
  mask_full, seg = _packed_rows(s, [[4, 8, 12], [9, 15]], True)
  q, key, val, r = _inputs(2, s, 1, 2, 8, seg, seed=3)
  q, r, mask = q[:, off:], r[:, off:], mask_full[:, off:]
  want = attend(q, key, val, mask, None)
  got = window_flash_attention(q, key, val, mask, None, 4, 4, off, True)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  gw = jax.grad(lambda *a: jnp.sum(attend(*a, mask, None) * r), argnums=(0, 1, 2))(q, key, val)
  gg = jax.grad(lambda *a: jnp.sum(window_flash_attention(*a, mask, None, 4, 4, off, True) * r),
                argnums=(0, 1, 2))(q, key, val)
  for a, e in zip(gg, gw):
    np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-5)


def test_window_index_is_the_narrowest_window_holding_the_first_visible_key():
  """Against a brute-force reading of the mask, block by block and row by row."""
  t, block, tile = 40, 8, 4
  mask, _ = _packed_rows(t, [[7, 13, 20], [40], [25]], True)
  sel = np.asarray(window_index(mask, block, tile))
  m = np.asarray(mask)
  for b in range(m.shape[0]):
    for i, lo in enumerate(range(0, t, block)):
      hi = min(lo + block, t)
      cols = np.flatnonzero(m[b, lo:hi].any(axis=0))
      widths = window_widths(hi, tile)
      w = widths[sel[b, i]]
      if cols.size:
        assert hi - w <= cols[0], (b, i)               # holds every visible key ...
        assert sel[b, i] == 0 or hi - widths[sel[b, i] - 1] > cols[0], (b, i)  # ... narrowest
        assert not m[b, lo:hi, hi:].any()              # and nothing after the block is seen
      else:
        assert sel[b, i] == 0
  # Row 0's last block (slots 32..39, segment 3 from slot 20) needs keys 20..39 only.
  assert window_widths(40, tile)[sel[0, -1]] == 20
  assert sel[1, -1] == len(window_widths(40, tile)) - 1  # one segment: all keys


def test_windows_skip_score_work():
  """Two 16-slot segments in a 32-slot row: the chosen windows hold 48 of the 80 key columns
  of the causal blocks (the second segment's blocks start at its first slot, 16)."""
  t, block, tile = 32, 8, 8
  mask, _ = _packed_rows(t, [[16, 16]], False)
  sel = np.asarray(window_index(mask, block, tile))[0]
  taken = sum(window_widths(hi, tile)[j] for hi, j in zip(range(block, t + 1, block), sel))
  causal = sum(range(block, t + 1, block))
  assert taken == 8 + 16 + 8 + 16 and causal == 80


@pytest.mark.parametrize("preset,scan", [("tiny_gemma", True), ("tiny_gemma2", False)])
def test_model_unchanged_by_key_windows(preset, scan):
  """Loss, logits at real tokens and parameter gradients do not depend on the kernels'
  attention_key_tile (packed segments with prompt-sharing branches, padding, Gemma 2
  soft-capping and local layers, scanned layers), and equal plain attention's."""
  cfg = models.get_config(preset, scan_layers=scan)
  blocks = Kernels.for_platform("cpu", attention_causal_block=4, attention_query_block=8)
  params = models.init_params(cfg, jax.random.PRNGKey(0))
  t = 21
  _, seg = _packed_rows(t, [[6, 9, 6], [13]], False)
  br = np.zeros_like(seg)
  br[:, 3:6], br[:, 6:9] = 1, 2
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, t), 3, cfg.vocab_size)
  real = jnp.asarray(seg != 0)[..., None]

  def run(kernels):
    def f(p):
      logits = models.forward(cfg, p, tokens, segment_ids=jnp.asarray(seg),
                              branch_ids=jnp.asarray(br), kernels=kernels)
      return jnp.sum(jax.nn.log_softmax(logits)[..., 7] * real[..., 0]), logits
    return jax.jit(jax.value_and_grad(f, has_aux=True))(params)

  (l0, logits0), g0 = run(Kernels(attention="xla", attention_query_block=0,
                                  attention_causal_block=0))
  for kernels in (blocks, blocks.replace(attention_key_tile=2)):
    (l1, logits1), g1 = run(kernels)
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    np.testing.assert_allclose(jnp.where(real, logits1, 0), jnp.where(real, logits0, 0),
                               rtol=1e-4, atol=1e-5)
    for a, e in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
      np.testing.assert_allclose(a, e, rtol=1e-3, atol=1e-5)


def test_batch_is_split_reads_the_mesh_and_rules():
  from flax import linen as nn
  from prefjax import sharding
  assert not batch_is_split()  # no mesh
  mesh = sharding.make_mesh()
  with jax.set_mesh(mesh), nn.logical_axis_rules(list(sharding.rules_from_config(None))):
    assert batch_is_split() == (sharding.num_batch_shards(mesh) > 1)


def test_key_tile_must_not_be_negative():
  with pytest.raises(ValueError, match="attention_key_tile=-1 must be >= 0"):
    Kernels.for_platform("cpu", attention_key_tile=-1)
