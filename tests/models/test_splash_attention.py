"""The Pallas TPU attention kernel (interpret mode on CPU) equals XLA attention under every mask
prefjax builds: padded, packed, sliding-window and prompt-shared rows; values and gradients."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh

from prefjax.models import splash_attention as sa
from prefjax.models.transformer import attention_mask
from tests.models.attention_util import random_attention_inputs

ROOT = pathlib.Path(__file__).resolve().parents[2]
BLOCK = 128  # smallest legal block (lane width): several blocks per row at T = 256


def _segments_row(t: int, lengths: list[int]):
  """One packed row: segment ids (1, 2, ...; 0 after the last), positions restarting at 0."""
  seg, pos = np.zeros(t, np.int32), np.zeros(t, np.int32)
  p = 0
  for i, n in enumerate(lengths):
    seg[p:p + n] = i + 1
    pos[p:p + n] = np.arange(n)
    p += n
  return seg, pos, np.zeros(t, np.int32)


def _prompt_shared_row(t: int, triples: list[tuple[int, int, int]]):
  """One row of [prompt (branch 0)][chosen (1)][rejected (2)] segments, then padding; chosen and
  rejected positions both continue from the end of the prompt."""
  seg, pos, br = np.zeros(t, np.int32), np.zeros(t, np.int32), np.zeros(t, np.int32)
  s = 0
  for i, (n_p, n_c, n_r) in enumerate(triples):
    seg[s:s + n_p + n_c + n_r] = i + 1
    pos[s:s + n_p + n_c] = np.arange(n_p + n_c)
    pos[s + n_p + n_c:s + n_p + n_c + n_r] = n_p + np.arange(n_r)
    br[s + n_p:s + n_p + n_c] = 1
    br[s + n_p + n_c:s + n_p + n_c + n_r] = 2
    s += n_p + n_c + n_r
  return seg, pos, br


def _layout(kind: str, t: int):
  """(segment_ids, positions, branch_ids) [2, T] for a mask kind (T >= 200; each batch has a
  row with padding at the end; the packed kinds cross block boundaries inside segments)."""
  if kind == "padded":
    rows = [_segments_row(t, [t - 37]), _segments_row(t, [t])]
  elif kind == "packed":
    rows = [_segments_row(t, [70, 90, 60]), _segments_row(t, [20, 150, 5, 31])]
  elif kind == "prompt_shared":
    rows = [_prompt_shared_row(t, [(30, 50, 40), (20, 25, 25)]),
            _prompt_shared_row(t, [(100, 40, 50), (5, 2, 3)])]
  elif kind == "with_empty_row":  # an all-padding row: every block skipped
    rows = [_prompt_shared_row(t, [(40, 40, 40)]), _segments_row(t, [])]
  else:
    raise ValueError(kind)
  seg, pos, br = (jnp.asarray(np.stack(x)) for x in zip(*rows))
  return seg, pos, (br if kind in ("prompt_shared", "with_empty_row") else None)


_inputs = random_attention_inputs


def _value_and_grads(fn, q, key, val, ct):
  """(output, (dq, dk, dv)) of sum(fn(q, k, v) * ct), jitted."""
  def loss(q, key, val):
    out = fn(q, key, val)
    return jnp.sum(out * ct), out
  grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, key, val)
  return out, grads


def _assert_close(got, want, what, rtol=1e-5):
  got, want = np.asarray(got), np.asarray(want)
  assert np.isfinite(got).all(), what
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max(),
                             err_msg=what)


def _check(kind, heads, *, window=None, softcap=None, t=256, h=32, block_q=BLOCK,
           block_kv=BLOCK):
  seg, pos, br = _layout(kind, t)
  k, g = heads
  q, key, val, ct = _inputs(seg.shape[0], t, k, g, h, seg)
  kw = dict(segment_ids=seg, positions=pos, branch_ids=br, window=window, softcap=softcap)
  out, grads = _value_and_grads(
      lambda *a: sa.splash_attention(*a, block_q=block_q, block_kv=block_kv, **kw),
      q, key, val, ct)
  ref, ref_grads = _value_and_grads(lambda *a: sa.reference_attention(*a, **kw), q, key, val,
                                    ct)
  real = np.asarray(seg != 0)
  _assert_close(np.asarray(out)[real], np.asarray(ref)[real], "output at real queries")
  assert np.all(np.asarray(out)[~real] == 0), "padding queries give 0"
  for name, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
    _assert_close(a, b, name)


MHA, GQA, MQA = (2, 1), (2, 2), (1, 4)


@pytest.mark.parametrize("kind,heads,window,softcap", [
    ("padded", MHA, None, None),
    ("packed", GQA, None, 5.0),
    ("packed", MQA, 48, None),
    ("prompt_shared", MQA, None, None),
    ("prompt_shared", GQA, 40, 5.0),
    ("prompt_shared", MHA, 75, None),
    ("with_empty_row", MQA, 30, None),
])
def test_matches_xla_attention(kind, heads, window, softcap):
  _check(kind, heads, window=window, softcap=softcap)


def test_length_not_a_block_multiple_and_unequal_blocks():
  """T = 200 is padded (segment 0) to 256 inside; block_q 128 against block_kv 256."""
  _check("prompt_shared", GQA, window=64, t=200, block_q=128, block_kv=256)


def test_window_on_positions_not_slots():
  """In a prompt-shared row the rejected response's positions continue from the prompt: a window
  on slots would drop prompt keys it must see (the kernel equals the positions mask)."""
  seg, pos, br = _layout("prompt_shared", 256)
  idx = jnp.arange(256)
  on_pos = attention_mask(idx, idx, seg, seg, q_positions=pos, k_positions=pos, window=60,
                          q_branches=br, k_branches=br)
  on_slots = attention_mask(idx, idx, seg, seg, q_positions=jnp.broadcast_to(idx, seg.shape),
                            k_positions=jnp.broadcast_to(idx, seg.shape), window=60,
                            q_branches=br, k_branches=br)
  assert bool(jnp.any(on_pos != on_slots))  # the case below is not vacuous
  _check("prompt_shared", MQA, window=60)


@pytest.mark.parametrize("kind,window", [("padded", None), ("packed", 48),
                                         ("prompt_shared", None), ("prompt_shared", 40)])
def test_block_classes_are_conservative(kind, window):
  """SKIP blocks hold no visible pair, FULL blocks only visible pairs (blocks of 32 here)."""
  t, blk = 256, 32
  seg, pos, br = _layout(kind, t)
  cfg = sa._Config(blk, blk, 1, window, None, br is not None, True)
  code = sa._token_codes(seg, br)
  state = np.asarray(sa._classify(cfg, code, pos if window else None))
  idx = jnp.arange(t)
  mask = np.asarray(attention_mask(idx, idx, seg, seg, q_positions=pos, k_positions=pos,
                                   window=window, q_branches=br, k_branches=br))
  blocks = mask.reshape(2, t // blk, blk, t // blk, blk).transpose(0, 1, 3, 2, 4)
  assert not blocks[state == sa.SKIP].any()
  assert blocks[state == sa.FULL].all()
  assert (state == sa.SKIP).any() and (window is not None or (state == sa.FULL).any())


def test_prompt_shared_skips_the_other_response():
  """With block-aligned [prompt][chosen][rejected], rejected queries skip the chosen block."""
  seg, pos, br = _prompt_shared_row(512, [(128, 128, 128)])
  seg, pos, br = (jnp.asarray(x)[None] for x in (seg, pos, br))
  cfg = sa._Config(128, 128, 1, None, None, True, True)
  state = np.asarray(sa._classify(cfg, sa._token_codes(seg, br), None))[0]
  assert state[2, 1] == sa.SKIP and state[2, 0] == sa.FULL and state[1, 0] == sa.FULL
  assert state[1, 1] == state[2, 2] == sa.PARTIAL and (state[3] == sa.SKIP).all()


@pytest.mark.parametrize("b,heads", [(4, (1, 2)), (2, (2, 1)), (2, (1, 3))])
def test_sharded_matches_single_device(b, heads):
  """Under jax.set_mesh on 8 CPU devices (data 2, fsdp 2, tensor 2): the shard_map path. B = 4
  splits over data and fsdp, B = 2 over data only; MQA with G = 2 splits the query groups over
  tensor, K = 2 the kv heads, G = 3 neither (replicated)."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 (fake) devices")
  t, k, g, h = 256, *heads, 16
  seg, pos, br = _layout("prompt_shared", t)
  seg, pos, br = (jnp.tile(x, (b // 2, 1)) for x in (seg, pos, br))
  q, key, val, ct = _inputs(b, t, k, g, h, seg, seed=1)
  kw = dict(segment_ids=seg, positions=pos, branch_ids=br, window=50, softcap=5.0)
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"),
              axis_types=(AxisType.Auto,) * 3)
  with jax.set_mesh(mesh):
    out, grads = _value_and_grads(
        lambda *a: sa.splash_attention(*a, block_q=BLOCK, block_kv=BLOCK, **kw), q, key, val, ct)
  ref, ref_grads = _value_and_grads(lambda *a: sa.reference_attention(*a, **kw), q, key, val,
                                    ct)
  real = np.asarray(seg != 0)
  _assert_close(np.asarray(out)[real], np.asarray(ref)[real], "output")
  for name, x, y in zip(("dq", "dk", "dv"), grads, ref_grads):
    _assert_close(x, y, name)


_AOT_SCRIPT = """
import json, sys, time
import numpy as np, jax, jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
from prefjax.models.splash_attention import splash_attention
try:
  topo = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu")
except Exception as e:  # no usable libtpu here
  print(json.dumps({"skip": repr(e)})); sys.exit(0)
mesh = Mesh(np.array(topo.devices).reshape(1, 4, 1), ("data", "fsdp", "tensor"),
            axis_types=(AxisType.Auto,) * 3)
B, T, K, G, H = 4, 1024, 1, 8, 256
rows = NamedSharding(mesh, P(("data", "fsdp")))
arr = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=rows)
q, kv = arr((B, T, K, G, H), jnp.bfloat16), arr((B, T, K, H), jnp.bfloat16)
ids = arr((B, T), jnp.int32)

def step(q, k, v, seg, pos, br, ct):
  def loss(q, k, v):
    o = splash_attention(q, k, v, segment_ids=seg, positions=pos, branch_ids=br, window=512,
                         softcap=50.0)
    return jnp.sum((o * ct).astype(jnp.float32))
  return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

t0 = time.time()
with jax.set_mesh(mesh):
  compiled = jax.jit(step).lower(q, kv, kv, ids, ids, ids, q).compile()
m = compiled.memory_analysis()
text = compiled.as_text()
print(json.dumps({"compiled": True, "seconds": round(time.time() - t0, 1),
                  "kernels": sum(f"prefjax_flash_{p}" in text for p in ("fwd", "dq", "dkv")),
                  "argument_bytes": m.argument_size_in_bytes,
                  "output_bytes": m.output_size_in_bytes, "temp_bytes": m.temp_size_in_bytes}))
"""


def test_compiles_for_tpu_ahead_of_time():
  """Forward + backward under shard_map for a v5e:2x2 slice (Mosaic lowering, no TPU needed):
  prompt-shared rows, window 512, soft-capping, MQA with 8 query heads, bf16."""
  pytest.importorskip("libtpu")
  env = dict(os.environ, JAX_PLATFORMS="cpu", TPU_ACCELERATOR_TYPE="v5litepod-4",
             TPU_WORKER_HOSTNAMES="localhost", ALLOW_MULTIPLE_LIBTPU_LOAD="1",
             PYTHONPATH=str(ROOT))
  env.pop("XLA_FLAGS", None)
  out = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  res = json.loads(out.stdout.strip().splitlines()[-1])
  if "skip" in res:
    pytest.skip(f"TPU topology unavailable: {res['skip']}")
  assert res["compiled"] and res["kernels"] == 3, res
