"""Self-attention on TPU as Pallas kernels, for every mask prefjax builds (no KV cache).

`splash_attention(qg, key, val, segment_ids=..., positions=..., branch_ids=..., window=...,
softcap=...)` equals `attend_reference(qg, key, val, transformer.attention_mask(...), softcap)`
at every query that sees a key:

  causal on slot index AND same segment AND key segment != 0 AND (with `window`)
  q_pos - k_pos < window AND (with branch ids) key branch == 0 or key branch == query branch.

Design. The four row layouts prefjax trains on are (1) padded rows, (2) packed rows, (3) Gemma 2/3
local layers (window on positions) and (4) prompt-shared rows, [prompt (branch 0)][chosen (1)]
[rejected (2)] per segment, where a response sees its prompt and itself but never the other
response, and where the rejected positions restart after the prompt (slot distance != position
distance). Splash attention (`make_splash_mha`) takes `SegmentIds` plus a mask over slot indices
that is the same for every row of the batch; it cannot express (4) per row, nor (3) on positions
that differ from slots, and two splash passes merged by their log-sum-exps would still need a
per-row mask for the prompt/response split. So this module is one flash-attention kernel whose
mask is computed inside the kernel from per-token ids of the query and key blocks, the way
splash computes its segment mask:

  code = segment * 256 + branch      (one int32 per token; branch ids in [0, 256))
  visible = k_slot <= q_slot  &  k_code >= 256  &  (k_code == q_code | k_code == q_code & ~255)
            [& q_pos - k_pos < window]

`k_code == q_code` is "same segment and same branch", `k_code == q_code & ~255` is "same segment
and key branch 0"; without branch ids every branch is 0 and the first test alone is the mask.

The kernels follow FlashAttention-2 (Dao 2023, "FlashAttention-2: Faster Attention with Better
Parallelism and Work Partitioning", arXiv:2307.08691): the forward pass (Alg. 1) keeps a running
row max m, row sum l and unnormalised output per query block while it walks the key blocks, and
saves only the output and lse = m + log l; the backward pass (Alg. 2) recomputes
P = exp(S - lse) per tile and forms dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dO * O)),
dQ = dS K, dK = dS^T Q, in two kernels: one walks key blocks per query block (dQ), the other
walks query blocks and the G query heads of each key head per key block (dK, dV, so GQA / MQA
gradients are summed in VMEM). Gemma 2's soft-capping s = c * tanh(s / c) is applied to the
scores and its derivative 1 - tanh^2 to dS.

Block skipping. Before the kernels run, every (query block, key block) pair of every row is
classified from per-block ranges of the ids (O(B * T) work): SKIP (no pair can be visible:
strictly above the diagonal, disjoint segment ranges, a key block of responses whose branch range
misses the query block's, or every pair outside the window), FULL (every pair visible: below the
diagonal, one segment, compatible branches, inside the window; the mask is not computed) or
PARTIAL. The classes and a "which block to fetch" table are scalar-prefetched into SMEM; a
skipped step does no compute and re-points its key (or query) block at the last fetched one, so
the pipeline issues no DMA for it (splash's `data_next` idea). The test is conservative (ranges,
not sets): it never skips a block with a visible pair, and it can compute a block that turns out
to be fully masked, which the in-kernel mask then handles.

Queries that see no key. A query with segment 0 (padding) sees nothing; the kernel returns 0 for
it (not the XLA reference's uniform average over all keys under a finite K_MASK), with a zero
gradient. Nothing reads padding outputs; compare non-padding rows only.

Sharding. Mosaic kernels cannot be partitioned by GSPMD, so under `jax.set_mesh(mesh)` the call
is a `jax.shard_map` over the mesh: batch over ("data", "fsdp") (the axes whose product divides
B), KV heads over "tensor" when it divides K, else the G query heads of each KV head over
"tensor" when it divides G (each kv head repeated once per group shard outside the shard_map, so
autodiff of the repeat sums the shards' dK / dV), else replicated (`check_vma=False`: shard_map's
transpose scales and sums the replicated cotangents). Without a mesh (or with one device) the
kernel is called directly. `interpret` defaults to False when the platform of the mesh's devices
(without a mesh: the default backend) is TPU, so the same code lowers ahead of time for a TPU
topology on a CPU host (`jax.experimental.topologies`).

Shapes: B batch, T length, K kv heads, G query heads per kv head (N = K * G), H head dim.
Kernel layouts: q / dO / O [B, N, Tp, H], k / v [B, K, Tp, H] with Tp = T padded (segment 0) to a
multiple of the blocks.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

NUM_LANES = 128
NUM_SUBLANES = 8
# Logit of a masked pair inside the kernel (finite: max/exp arithmetic stays NaN-free).
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
BRANCH_BITS = 8  # code = segment << BRANCH_BITS | branch
SEGMENT_UNIT = 1 << BRANCH_BITS
SEGMENT_BITS = -SEGMENT_UNIT  # ~(SEGMENT_UNIT - 1): clears the branch bits
DEFAULT_BLOCK = 512
SKIP, PARTIAL, FULL = 0, 1, 2
BATCH_AXES = ("data", "fsdp")
TENSOR_AXIS = "tensor"

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static kernel settings (hashable: a `custom_vjp` nondiff argument)."""
  block_q: int
  block_kv: int
  groups: int  # G, query heads per kv head
  window: int | None
  softcap: float | None
  branches: bool
  interpret: bool


# ----------------------------------------------------------------------------- public API


def splash_attention(qg: jax.Array, key: jax.Array, val: jax.Array, *, segment_ids: jax.Array,
                     positions: jax.Array | None, branch_ids: jax.Array | None = None,
                     window: int | None = None, softcap: float | None = None,
                     interpret: bool | None = None, block_q: int | None = None,
                     block_kv: int | None = None) -> jax.Array:
  """Self-attention (no KV cache) on TPU with Pallas kernels.

  qg: [B, T, K, G, H] queries, already RoPE'd and multiplied by the query scale (N = K*G heads;
      G = 1 is MHA, K = 1 is MQA, else GQA).  key, val: [B, T, K, H].
  segment_ids [B, T] int32 (0 = padding), positions [B, T] int32 (needed with `window`),
  branch_ids [B, T] int32 in [0, 256) or None.
  window: int or None (sliding window on POSITIONS: q_pos - k_pos < window).
  softcap: float or None (Gemma 2 attention logit soft-capping: s = c * tanh(s / c)).
  interpret: run the kernels in the Pallas interpreter; None: unless the platform is TPU.
  block_q / block_kv: rows per query / key block (multiples of 128; default min(512, T
      rounded up to 128)). T is padded with segment 0 to a multiple of both.
  Returns [B, T, K, G, H] in qg.dtype; 0 at queries that see no key (segment 0).
  """
  b, t, k, g, h = qg.shape
  if key.shape != (b, t, k, h) or val.shape != key.shape:
    raise ValueError(f"key/val must be [B, T, K, H] = {(b, t, k, h)}, got {key.shape}, "
                     f"{val.shape}")
  if segment_ids.shape != (b, t):
    raise ValueError(f"segment_ids must be [B, T] = {(b, t)}, got {segment_ids.shape}")
  if window is not None and (positions is None or window < 1):
    raise ValueError(f"window={window} needs positions and window >= 1")
  mesh = jax.sharding.get_abstract_mesh()
  if interpret is None:
    interpret = _platform(mesh) != "tpu"
  sharded = not mesh.empty and mesh.size > 1
  batch_axes, split = _shard_plan(mesh, b, k, g) if sharded else (None, 1)
  bq, bkv = _block_sizes(t, block_q, block_kv)
  cfg = _Config(bq, bkv, g // split, None if window is None else int(window),
                None if softcap is None else float(softcap), branch_ids is not None,
                bool(interpret))
  code = _token_codes(segment_ids, branch_ids)
  pos = positions.astype(jnp.int32) if window is not None else None
  if not sharded:
    return _attention_local(cfg, qg, key, val, code, pos)
  return _attention_sharded(cfg, mesh, batch_axes, split, qg, key, val, code, pos)


def reference_attention(qg: jax.Array, key: jax.Array, val: jax.Array, *,
                        segment_ids: jax.Array, positions: jax.Array | None,
                        branch_ids: jax.Array | None = None, window: int | None = None,
                        softcap: float | None = None) -> jax.Array:
  """The XLA oracle: `attend_reference` under `transformer.attention_mask` (same arguments and
  result shape as `splash_attention`; padding queries average all keys)."""
  from prefjax.models.attention_kernels import attend_reference  # noqa: PLC0415
  from prefjax.models.transformer import attention_mask  # noqa: PLC0415 (imports this module)
  idx = jnp.arange(qg.shape[1])
  mask = attention_mask(idx, idx, segment_ids, segment_ids, q_positions=positions,
                        k_positions=positions, window=window, q_branches=branch_ids,
                        k_branches=branch_ids)
  return attend_reference(qg, key, val, mask, softcap)


# ----------------------------------------------------------------------------- wrapper helpers


def _platform(mesh) -> str:
  """Platform of the mesh's devices ('tpu', 'cpu', ...); the default backend without a mesh."""
  device = None if mesh.empty else getattr(mesh, "abstract_device", None)
  return device.platform if device is not None else jax.default_backend()


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _block_sizes(t: int, block_q: int | None, block_kv: int | None) -> tuple[int, int]:
  """(block_q, block_kv): given, or min(512, T rounded up to 128); multiples of 128."""
  default = min(DEFAULT_BLOCK, _round_up(t, NUM_LANES))
  bq, bkv = block_q or default, block_kv or default
  if bq % NUM_LANES or bkv % NUM_LANES:
    raise ValueError(f"block_q={bq} and block_kv={bkv} must be multiples of {NUM_LANES}")
  return bq, bkv


def _token_codes(segment_ids: jax.Array, branch_ids: jax.Array | None) -> jax.Array:
  """[B, T] segment << 8 | branch (int32)."""
  code = segment_ids.astype(jnp.int32) << BRANCH_BITS
  return code if branch_ids is None else code | branch_ids.astype(jnp.int32)


def _tensor_divides(mesh, n: int) -> bool:
  """Whether the mesh has a "tensor" axis of size > 1 that divides n."""
  size = mesh.shape.get(TENSOR_AXIS, 1)
  return size > 1 and n % size == 0


def _shard_plan(mesh, b: int, k: int, g: int) -> tuple[tuple[str, ...] | None, int]:
  """(mesh axes of the batch dim, split): the ("data", "fsdp") axes whose product divides B, and
  into how many "tensor" shards the G query heads per kv head are split (1: the kv heads are
  split over "tensor" when it divides K, else the heads are replicated)."""
  batch, size = [], 1
  for name in BATCH_AXES:
    n = mesh.shape.get(name, 1)
    if n > 1 and b % (size * n) == 0:
      batch.append(name)
      size *= n
  split = 1
  if not _tensor_divides(mesh, k) and _tensor_divides(mesh, g):
    split = mesh.shape[TENSOR_AXIS]
  return (tuple(batch) if batch else None), split


def _attention_sharded(cfg: _Config, mesh, batch_axes, split: int, qg, key, val, code, pos):
  """`_attention_local` under `jax.shard_map` over the current mesh (see `_shard_plan`)."""
  b, t, k, g, h = qg.shape
  heads = TENSOR_AXIS if split > 1 or _tensor_divides(mesh, k) else None
  if split > 1:  # query groups over "tensor": a copy of each kv head per group shard
    qg = qg.reshape(b, t, k * split, g // split, h)
    key, val = jnp.repeat(key, split, axis=2), jnp.repeat(val, split, axis=2)
  q_spec = P(batch_axes, None, heads, None, None)
  kv_spec, id_spec = P(batch_axes, None, heads, None), P(batch_axes, None)
  out = jax.shard_map(functools.partial(_attention_local, cfg),
                      in_specs=(q_spec, kv_spec, kv_spec, id_spec,
                                None if pos is None else id_spec),
                      out_specs=q_spec, check_vma=False)(qg, key, val, code, pos)
  return out.reshape(b, t, k, g, h)


def _attention_local(cfg: _Config, qg, key, val, code, pos):
  """One shard: pads T, moves heads before length, classifies blocks, runs `_flash`."""
  b, t, k, g, h = qg.shape
  tp = _round_up(t, math.lcm(cfg.block_q, cfg.block_kv))
  if tp != t:
    pad = ((0, 0), (0, tp - t))
    qg = jnp.pad(qg, pad + ((0, 0),) * 3)
    key = jnp.pad(key, pad + ((0, 0),) * 2)
    val = jnp.pad(val, pad + ((0, 0),) * 2)
    code = jnp.pad(code, pad)  # segment 0: padding
    pos = None if pos is None else jnp.pad(pos, pad)
  q = jnp.transpose(qg, (0, 2, 3, 1, 4)).reshape(b, k * g, tp, h)
  kk = jnp.transpose(key, (0, 2, 1, 3))
  vv = jnp.transpose(val, (0, 2, 1, 3))
  tables = _block_tables(cfg, code, pos)
  out = _flash(cfg, q, kk, vv, code, pos, tables)
  out = jnp.transpose(out.reshape(b, k, g, tp, h), (0, 3, 1, 2, 4))
  return out[:, :t]


# ----------------------------------------------------------------------------- block tables


def _block_stats(code: jax.Array, pos: jax.Array | None, block: int) -> dict[str, jax.Array]:
  """Per-block ranges over the non-padding tokens of [B, T] ids -> dict of [B, T // block]."""
  b, t = code.shape
  c = code.reshape(b, t // block, block)
  valid = c >= SEGMENT_UNIT
  big = jnp.int32(2**30)

  def lo(x):
    return jnp.min(jnp.where(valid, x, big), axis=-1)

  def hi(x):
    return jnp.max(jnp.where(valid, x, -big), axis=-1)

  seg, br = c >> BRANCH_BITS, c & (SEGMENT_UNIT - 1)
  stats = dict(any=valid.any(-1), all=valid.all(-1), seg_lo=lo(seg), seg_hi=hi(seg),
               br_lo=lo(br), br_hi=hi(br))
  if pos is not None:
    p = pos.reshape(b, t // block, block)
    stats.update(pos_lo=lo(p), pos_hi=hi(p))
  return stats


def _classify(cfg: _Config, code: jax.Array, pos: jax.Array | None) -> jax.Array:
  """[B, nq, nk] int32 SKIP / PARTIAL / FULL per (query block, key block)."""
  bq, bkv = cfg.block_q, cfg.block_kv
  qs = {n: x[:, :, None] for n, x in _block_stats(code, pos, bq).items()}
  ks = {n: x[:, None, :] for n, x in _block_stats(code, pos, bkv).items()}
  nq, nk = code.shape[1] // bq, code.shape[1] // bkv
  q_first = (jnp.arange(nq) * bq)[None, :, None]
  k_first = (jnp.arange(nk) * bkv)[None, None, :]
  one_seg = (qs["seg_lo"] == qs["seg_hi"]) & (ks["seg_lo"] == ks["seg_hi"])
  visible = ((k_first <= q_first + bq - 1) & qs["any"] & ks["any"]
             & (qs["seg_lo"] <= ks["seg_hi"]) & (ks["seg_lo"] <= qs["seg_hi"]))
  full = (k_first + bkv - 1 <= q_first) & qs["all"] & ks["all"] & one_seg & (
      qs["seg_lo"] == ks["seg_lo"])
  if cfg.branches:
    visible &= (ks["br_lo"] == 0) | ((qs["br_lo"] <= ks["br_hi"]) & (ks["br_lo"] <= qs["br_hi"]))
    one_branch = (qs["br_lo"] == qs["br_hi"]) & (ks["br_lo"] == ks["br_hi"])
    full &= (ks["br_hi"] == 0) | (one_branch & (qs["br_lo"] == ks["br_lo"]))
  if cfg.window is not None:
    visible &= qs["pos_lo"] - ks["pos_hi"] < cfg.window
    full &= qs["pos_hi"] - ks["pos_lo"] < cfg.window
  return jnp.where(visible, jnp.where(full, FULL, PARTIAL), SKIP).astype(jnp.int32)


def _fetch_index(state: jax.Array) -> jax.Array:
  """[..., C] block classes -> index along C to fetch at each step: the step's own index when it
  computes, else the last computing index before it (or the first after it), so skipped steps
  trigger no DMA."""
  c = state.shape[-1]
  j = jnp.arange(c, dtype=jnp.int32)
  active = state != SKIP
  last = lax.cummax(jnp.where(active, j, -1), axis=state.ndim - 1)
  first = jnp.min(jnp.where(active, j, c), axis=-1, keepdims=True)
  first = jnp.where(first == c, 0, first)
  return jnp.where(last >= 0, last, first).astype(jnp.int32)


def _block_tables(cfg: _Config, code: jax.Array, pos: jax.Array | None):
  """Flattened SMEM tables: (state, fetch) over [B, nq, nk] for the forward / dQ kernels and
  over [B, nk, nq] for the dK/dV kernel."""
  state = _classify(cfg, code, pos)
  state_t = jnp.swapaxes(state, 1, 2)
  return (state.reshape(-1), _fetch_index(state).reshape(-1), state_t.reshape(-1),
          _fetch_index(state_t).reshape(-1))


# ----------------------------------------------------------------------------- in-kernel math


def _visible(cfg: _Config, q_code, k_code, q_pos, k_pos, q_slot, k_slot) -> jax.Array:
  """The prefjax mask on broadcastable id blocks (see the module docstring)."""
  same = k_code == q_code
  if cfg.branches:
    same = same | (k_code == (q_code & SEGMENT_BITS))
  mask = (k_slot <= q_slot) & (k_code >= SEGMENT_UNIT) & same
  if cfg.window is not None:
    mask = mask & (q_pos - k_pos < cfg.window)
  return mask


def _mask_keys_in_lanes(cfg, qc_ref, kc_ref, qp_ref, kp_ref, i, j):
  """[bq, bkv] mask of query block i x key block j; q ids [bq, 128], k ids [8, bkv]."""
  bq, bkv = cfg.block_q, cfg.block_kv
  shape, rep = (bq, bkv), bkv // NUM_LANES
  q_slot = i * bq + lax.broadcasted_iota(jnp.int32, shape, 0)
  k_slot = j * bkv + lax.broadcasted_iota(jnp.int32, shape, 1)
  q_pos = k_pos = None
  if cfg.window is not None:
    q_pos, k_pos = jnp.tile(qp_ref[...], (1, rep)), kp_ref[:1, :]
  return _visible(cfg, jnp.tile(qc_ref[...], (1, rep)), kc_ref[:1, :], q_pos, k_pos, q_slot,
                  k_slot)


def _mask_queries_in_lanes(cfg, qc_ref, kc_ref, qp_ref, kp_ref, i, j):
  """[bkv, bq] (transposed) mask of key block j x query block i; q ids [8, bq], k ids
  [bkv, 128]."""
  bq, bkv = cfg.block_q, cfg.block_kv
  shape, rep = (bkv, bq), bq // NUM_LANES
  k_slot = j * bkv + lax.broadcasted_iota(jnp.int32, shape, 0)
  q_slot = i * bq + lax.broadcasted_iota(jnp.int32, shape, 1)
  q_pos = k_pos = None
  if cfg.window is not None:
    q_pos, k_pos = qp_ref[:1, :], jnp.tile(kp_ref[...], (1, rep))
  return _visible(cfg, qc_ref[:1, :], jnp.tile(kc_ref[...], (1, rep)), q_pos, k_pos, q_slot,
                  k_slot)


def _capped(cfg: _Config, s: jax.Array) -> tuple[jax.Array, jax.Array | None]:
  """Soft-capped scores c * tanh(s / c) and tanh(s / c) (None without soft-capping)."""
  if cfg.softcap is None:
    return s, None
  th = jnp.tanh(s / cfg.softcap)
  return th * cfg.softcap, th


def _lanes_to(x: jax.Array, width: int) -> jax.Array:
  """[rows, 128] lane-replicated column -> [rows, width]."""
  return jnp.tile(x, (1, pl.cdiv(width, NUM_LANES)))[:, :width]


def _split_ids(cfg: _Config, refs):
  """(q code, k code, q pos, k pos) refs from the front of `refs`, and the rest."""
  if cfg.window is None:
    return (refs[0], refs[1], None, None), refs[2:]
  return tuple(refs[:4]), refs[4:]


# ----------------------------------------------------------------------------- forward kernel


def _fwd_kernel(state_ref, fetch_ref, q_ref, k_ref, v_ref, *refs, cfg: _Config, nq: int,
                nk: int):
  """Grid (B, N, nq, nk): one query block against key block j (FlashAttention-2, Alg. 1)."""
  del fetch_ref
  ids, (o_ref, lse_ref, m_sc, l_sc, acc_sc) = _split_ids(cfg, refs)
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  state = state_ref[(b * nq + i) * nk + j]
  head_dim = acc_sc.shape[-1]

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full_like(m_sc, MASK_VALUE)
    l_sc[...] = jnp.zeros_like(l_sc)
    acc_sc[...] = jnp.zeros_like(acc_sc)

  def step(masked: bool):
    s = lax.dot_general(q_ref[...], k_ref[...], _NT, preferred_element_type=jnp.float32)
    s, _ = _capped(cfg, s)
    if masked:
      mask = _mask_keys_in_lanes(cfg, *ids, i, j)
      s = jnp.where(mask, s, MASK_VALUE)
    m_prev = m_sc[...]
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))  # [bq, 128]
    p = jnp.exp(s - jnp.tile(m_next, (1, cfg.block_kv // NUM_LANES)))
    if masked:
      p = jnp.where(mask, p, 0.0)  # exact zeros, also in rows with no visible key yet
    alpha = jnp.exp(m_prev - m_next)
    l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=-1, keepdims=True)
    m_sc[...] = m_next
    pv = lax.dot_general(p.astype(v_ref.dtype), v_ref[...], _NN,
                         preferred_element_type=jnp.float32)
    acc_sc[...] = _lanes_to(alpha, head_dim) * acc_sc[...] + pv

  pl.when(state == FULL)(lambda: step(False))
  pl.when(state == PARTIAL)(lambda: step(True))

  @pl.when(j == nk - 1)
  def _end():
    l = l_sc[...]
    seen = l > 0.0
    l_safe = jnp.where(seen, l, 1.0)
    inv = jnp.where(seen, 1.0 / l_safe, 0.0)
    o_ref[...] = (acc_sc[...] * _lanes_to(inv, head_dim)).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m_sc[...] + jnp.log(l_safe), 0.0)


def _lanes_ids(x: jax.Array) -> jax.Array:
  """[B, T] -> [B, T, 128] (each token's id across the lanes)."""
  return jnp.broadcast_to(x[:, :, None], x.shape + (NUM_LANES,))


def _sublane_ids(x: jax.Array) -> jax.Array:
  """[B, T] -> [B, 8, T] (the ids along the lanes, repeated over the sublanes)."""
  return jnp.broadcast_to(x[:, None, :], (x.shape[0], NUM_SUBLANES, x.shape[1]))


def _ids_by_query_block(cfg, code, pos, q_map, k_map):
  """Operands and BlockSpecs of the ids for kernels with keys in lanes (forward, dQ)."""
  arrays = [_lanes_ids(code), _sublane_ids(code)]
  if cfg.window is not None:
    arrays += [_lanes_ids(pos), _sublane_ids(pos)]
  specs = [pl.BlockSpec((None, cfg.block_q, NUM_LANES), q_map),
           pl.BlockSpec((None, NUM_SUBLANES, cfg.block_kv), k_map)]
  return arrays, specs * (len(arrays) // 2)


def _query_major_maps(g: int, nq: int, nk: int):
  """Index maps of the grid (B, N, nq, nk) walking key blocks j per query block i:
  (kv_block, q_block, q_ids, k_ids); a skipped key block re-points at the last fetched one."""

  def kv_block(bi, ni, i, j, state_ref, fetch_ref):
    return bi, ni // g, fetch_ref[(bi * nq + i) * nk + j], 0

  def q_block(bi, ni, i, j, *_):
    return bi, ni, i, 0

  def q_ids(bi, ni, i, j, *_):
    return bi, i, 0

  def k_ids(bi, ni, i, j, state_ref, fetch_ref):
    return bi, 0, fetch_ref[(bi * nq + i) * nk + j]

  return kv_block, q_block, q_ids, k_ids


def _fwd_call(cfg: _Config, q, k, v, code, pos, tables):
  """q [B,N,Tp,H], k/v [B,K,Tp,H] -> out [B,N,Tp,H], lse float32 [B,N,Tp]."""
  b, n, tp, h = q.shape
  g, bq, bkv = cfg.groups, cfg.block_q, cfg.block_kv
  nq, nk = tp // bq, tp // bkv
  state, fetch = tables[0], tables[1]

  kv_block, q_block, q_ids, k_ids = _query_major_maps(g, nq, nk)

  id_arrays, id_specs = _ids_by_query_block(cfg, code, pos, q_ids, k_ids)
  in_specs = [pl.BlockSpec((None, None, bq, h), q_block),
              pl.BlockSpec((None, None, bkv, h), kv_block),
              pl.BlockSpec((None, None, bkv, h), kv_block), *id_specs]
  out_specs = [pl.BlockSpec((None, None, bq, h), q_block),
               pl.BlockSpec((None, None, bq, NUM_LANES), q_block)]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
               jax.ShapeDtypeStruct((b, n, tp, NUM_LANES), jnp.float32)]
  scratch = [pltpu.VMEM((bq, NUM_LANES), jnp.float32), pltpu.VMEM((bq, NUM_LANES), jnp.float32),
             pltpu.VMEM((bq, h), jnp.float32)]
  out, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg, nq=nq, nk=nk),
      grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=2, grid=(b, n, nq, nk),
                                             in_specs=in_specs, out_specs=out_specs,
                                             scratch_shapes=scratch),
      out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=cfg.interpret,
      name="prefjax_flash_fwd",
  )(state, fetch, q, k, v, *id_arrays)
  return out, lse[..., 0]


# ----------------------------------------------------------------------------- backward kernels


def _dq_kernel(state_ref, fetch_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, *refs,
               cfg: _Config, nq: int, nk: int):
  """Grid (B, N, nq, nk): dQ of one query block, summed over key blocks j."""
  del fetch_ref
  ids, (dq_ref, dq_sc) = _split_ids(cfg, refs)
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  state = state_ref[(b * nq + i) * nk + j]

  @pl.when(j == 0)
  def _init():
    dq_sc[...] = jnp.zeros_like(dq_sc)

  def step(masked: bool):
    k = k_ref[...]
    s = lax.dot_general(q_ref[...], k, _NT, preferred_element_type=jnp.float32)
    s, th = _capped(cfg, s)
    p = jnp.exp(s - lse_ref[0][:, None])
    if masked:
      p = jnp.where(_mask_keys_in_lanes(cfg, *ids, i, j), p, 0.0)
    dp = lax.dot_general(do_ref[...], v_ref[...], _NT, preferred_element_type=jnp.float32)
    ds = p * (dp - di_ref[0][:, None])
    if th is not None:
      ds = ds * (1.0 - th * th)
    dq_sc[...] += lax.dot_general(ds.astype(k.dtype), k, _NN, preferred_element_type=jnp.float32)

  pl.when(state == FULL)(lambda: step(False))
  pl.when(state == PARTIAL)(lambda: step(True))

  @pl.when(j == nk - 1)
  def _end():
    dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)


def _dq_call(cfg: _Config, q, k, v, do, lse, di, code, pos, tables):
  """dQ [B,N,Tp,H] from q/do [B,N,Tp,H], k/v [B,K,Tp,H], lse/di float32 [B,N,Tp]."""
  b, n, tp, h = q.shape
  g, bq, bkv = cfg.groups, cfg.block_q, cfg.block_kv
  nq, nk = tp // bq, tp // bkv
  state, fetch = tables[0], tables[1]

  kv_block, q_block, q_ids, k_ids = _query_major_maps(g, nq, nk)

  def row_block(bi, ni, i, j, *_):
    return bi, ni, 0, i

  id_arrays, id_specs = _ids_by_query_block(cfg, code, pos, q_ids, k_ids)
  in_specs = [pl.BlockSpec((None, None, bq, h), q_block),
              pl.BlockSpec((None, None, bkv, h), kv_block),
              pl.BlockSpec((None, None, bkv, h), kv_block),
              pl.BlockSpec((None, None, bq, h), q_block),
              pl.BlockSpec((None, None, 1, bq), row_block),
              pl.BlockSpec((None, None, 1, bq), row_block), *id_specs]
  return pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg, nq=nq, nk=nk),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(b, n, nq, nk), in_specs=in_specs,
          out_specs=pl.BlockSpec((None, None, bq, h), q_block),
          scratch_shapes=[pltpu.VMEM((bq, h), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=cfg.interpret,
      name="prefjax_flash_dq",
  )(state, fetch, q, k, v, do, lse[:, :, None, :], di[:, :, None, :], *id_arrays)


def _dkv_kernel(state_ref, fetch_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, *refs,
                cfg: _Config, nq: int, nk: int):
  """Grid (B, K, nk, G, nq): dK, dV of one key block, summed over the G query heads of its kv
  head and over query blocks i; scores are kept transposed ([bkv, bq])."""
  del fetch_ref
  ids, (dk_ref, dv_ref, dk_sc, dv_sc) = _split_ids(cfg, refs)
  b, j, gi, i = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)
  state = state_ref[(b * nk + j) * nq + i]

  @pl.when((gi == 0) & (i == 0))
  def _init():
    dk_sc[...] = jnp.zeros_like(dk_sc)
    dv_sc[...] = jnp.zeros_like(dv_sc)

  def step(masked: bool):
    q, do = q_ref[...], do_ref[...]
    s = lax.dot_general(k_ref[...], q, _NT, preferred_element_type=jnp.float32)  # [bkv, bq]
    s, th = _capped(cfg, s)
    p = jnp.exp(s - lse_ref[:1, :])
    if masked:
      p = jnp.where(_mask_queries_in_lanes(cfg, *ids, i, j), p, 0.0)
    dv_sc[...] += lax.dot_general(p.astype(do.dtype), do, _NN,
                                  preferred_element_type=jnp.float32)
    dp = lax.dot_general(v_ref[...], do, _NT, preferred_element_type=jnp.float32)
    ds = p * (dp - di_ref[:1, :])
    if th is not None:
      ds = ds * (1.0 - th * th)
    dk_sc[...] += lax.dot_general(ds.astype(q.dtype), q, _NN, preferred_element_type=jnp.float32)

  pl.when(state == FULL)(lambda: step(False))
  pl.when(state == PARTIAL)(lambda: step(True))

  @pl.when((gi == cfg.groups - 1) & (i == nq - 1))
  def _end():
    dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _dkv_call(cfg: _Config, q, k, v, do, lse, di, code, pos, tables):
  """(dK, dV) [B,K,Tp,H] from q/do [B,N,Tp,H], k/v [B,K,Tp,H], lse/di float32 [B,N,Tp]."""
  b, n, tp, h = q.shape
  kh = k.shape[1]
  g, bq, bkv = cfg.groups, cfg.block_q, cfg.block_kv
  nq, nk = tp // bq, tp // bkv
  state_t, fetch_t = tables[2], tables[3]

  def q_block(bi, ki, j, gi, i, state_ref, fetch_ref):
    return bi, ki * g + gi, fetch_ref[(bi * nk + j) * nq + i], 0

  def row_block(bi, ki, j, gi, i, state_ref, fetch_ref):
    return bi, ki * g + gi, 0, fetch_ref[(bi * nk + j) * nq + i]

  def kv_block(bi, ki, j, gi, i, *_):
    return bi, ki, j, 0

  def q_ids(bi, ki, j, gi, i, state_ref, fetch_ref):
    return bi, 0, fetch_ref[(bi * nk + j) * nq + i]

  def k_ids(bi, ki, j, gi, i, *_):
    return bi, j, 0

  id_arrays = [_sublane_ids(code), _lanes_ids(code)]
  if cfg.window is not None:
    id_arrays += [_sublane_ids(pos), _lanes_ids(pos)]
  id_specs = [pl.BlockSpec((None, NUM_SUBLANES, bq), q_ids),
              pl.BlockSpec((None, bkv, NUM_LANES), k_ids)] * (len(id_arrays) // 2)
  rows = lambda x: jnp.broadcast_to(x[:, :, None, :], (b, n, NUM_SUBLANES, tp))  # noqa: E731
  in_specs = [pl.BlockSpec((None, None, bq, h), q_block),
              pl.BlockSpec((None, None, bkv, h), kv_block),
              pl.BlockSpec((None, None, bkv, h), kv_block),
              pl.BlockSpec((None, None, bq, h), q_block),
              pl.BlockSpec((None, None, NUM_SUBLANES, bq), row_block),
              pl.BlockSpec((None, None, NUM_SUBLANES, bq), row_block), *id_specs]
  kv_spec = pl.BlockSpec((None, None, bkv, h), kv_block)
  return pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg, nq=nq, nk=nk),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(b, kh, nk, g, nq), in_specs=in_specs,
          out_specs=[kv_spec, kv_spec],
          scratch_shapes=[pltpu.VMEM((bkv, h), jnp.float32), pltpu.VMEM((bkv, h), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
      interpret=cfg.interpret,
      name="prefjax_flash_dkv",
  )(state_t, fetch_t, q, k, v, do, rows(lse), rows(di), *id_arrays)


# ----------------------------------------------------------------------------- custom VJP


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg: _Config, q, k, v, code, pos, tables):
  """Kernel-layout attention: q [B,N,Tp,H], k/v [B,K,Tp,H], code/pos [B,Tp] -> [B,N,Tp,H]."""
  return _fwd_call(cfg, q, k, v, code, pos, tables)[0]


def _flash_fwd(cfg, q, k, v, code, pos, tables):
  out, lse = _fwd_call(cfg, q, k, v, code, pos, tables)
  return out, (q, k, v, code, pos, tables, out, lse)


def _flash_bwd(cfg, res, d_out):
  q, k, v, code, pos, tables, out, lse = res
  d_out = d_out.astype(q.dtype)
  di = jnp.einsum("bnth,bnth->bnt", d_out, out, preferred_element_type=jnp.float32)
  dq = _dq_call(cfg, q, k, v, d_out, lse, di, code, pos, tables)
  dk, dv = _dkv_call(cfg, q, k, v, d_out, lse, di, code, pos, tables)
  return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
