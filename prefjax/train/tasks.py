"""Tasks: what differs between SFT, reward modelling, preference and KTO training.

A task only decides the batch layout and the loss. Every loss function here returns
`(loss_sum, stats)` where `stats` maps a metric name to a `(sum, count)` pair; the
train step sums both over micro-batches (and shards) and divides at the end, so
gradient accumulation is exact and per-example averages do not depend on how the
batch was split. `stats["loss"]` holds `(loss_sum, count)`.

Shape letters: B batch, P pair (0 chosen, 1 rejected), K responses, L length, R packed
rows, S pairs per row, N sequences, H reward heads.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from prefjax import losses as losses_lib
from prefjax import models
from prefjax import ops
from prefjax import sharding as sharding_lib

Stats = dict[str, tuple[jax.Array, jax.Array]]
LossFn = Callable[[Any, Optional[Any], dict[str, jax.Array]], tuple[jax.Array, Stats]]

TASKS = ("sft", "reward", "preference", "kto")
PAIR_LAYOUTS = ("padded", "packed", "prompt_shared")
_ROW_KEYS = ("tokens", "targets", "loss_mask", "positions", "segment_ids")


@dataclasses.dataclass(frozen=True)
class Task:
  """A loss over a batch layout, plus the same loss without gradients for eval.

  Attributes:
    name: one of TASKS.
    loss_fn: `(params, ref_params, batch) -> (loss_sum, stats)`.
    eval_fn: `(params, ref_params, batch) -> stats` (adds eval-only statistics).
    uses_ref_model: the loss needs reference log-probs from `ref_params`.
  """
  name: str
  loss_fn: LossFn
  eval_fn: Callable[[Any, Optional[Any], dict[str, jax.Array]], Stats]
  uses_ref_model: bool


# ----------------------------------------------------------------------------- layouts


def flatten_rows(batch: dict[str, jax.Array], layout: str
                 ) -> tuple[dict[str, jax.Array], jax.Array, int]:
  """Returns `(rows, seq_ids, num_seq)`: [R, L] model inputs and sequence ids 1..num_seq.

  Padded pairs [B, 2, L] become 2B rows of one sequence each; packed rows keep their
  segments (pair p: chosen 2p+1, rejected 2p+2); prompt-shared rows number sequences
  2(segment-1) + branch so prompts (branch 0) belong to no sequence.
  """
  rows = {}
  for k in _ROW_KEYS + ("branch_ids",):
    if k in batch:
      x = batch[k]
      rows[k] = x.reshape((-1, x.shape[-1]))
  seg = rows["segment_ids"]
  if layout == "packed":
    num_seq = 2 * batch["pair_mask"].shape[-1]
    seq_ids = seg
  elif layout == "prompt_shared":
    num_seq = 2 * batch["pair_mask"].shape[-1]
    br = rows["branch_ids"]
    seq_ids = jnp.where((br > 0) & (seg > 0), 2 * (seg - 1) + br, 0)
  else:
    num_seq = 1
    seq_ids = (seg > 0).astype(seg.dtype)
  return rows, seq_ids, num_seq


def forward(model_cfg: Any, params: Any, rows: dict[str, jax.Array],
            readout: Optional[jax.Array] = None, kernels: Optional[Any] = None) -> jax.Array:
  """Final hidden states [R, L, D] of the decoder ([R, n, D] at `readout` slots [R, n]).

  kernels: `models.Kernels` (None: the default backend's)."""
  kw = {"segment_ids": rows["segment_ids"], "positions": rows["positions"]}
  if "branch_ids" in rows:
    kw["branch_ids"] = rows["branch_ids"]
  return models.forward_hidden(model_cfg, params, rows["tokens"], readout=readout,
                               kernels=kernels, **kw)


@dataclasses.dataclass(frozen=True)
class HeadOptions:
  """How the vocabulary head computes log-probs (`ops.token_logps_from_hidden`).

  Attributes:
    chunk_size: positions per chunk (of every row at once).
    implementation: "custom_vjp" | "saved_logits" | "checkpoint" | None (the ops default);
      the trainer takes it from its `models.Kernels.logps_implementation`.
    compact: compute log-probs only at loss positions (`ops.token_logps_from_hidden`'s
      `where`): prompt and padding positions are dropped before the head, which then
      runs on chunks of `compact_chunk_size` compacted positions.
    compact_chunk_size: compacted positions per chunk (per batch shard).
  """
  chunk_size: int = 128
  implementation: Optional[str] = None
  compact: bool = True
  compact_chunk_size: int = 512


def _head(chunk_size: Any) -> HeadOptions:
  return chunk_size if isinstance(chunk_size, HeadOptions) else HeadOptions(int(chunk_size))


def _compaction_groups(rows: int) -> int:
  """Batch shards of the current mesh (1 outside one), as a divisor of `rows`: the compacted
  head sorts positions within each shard, never across."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or not all(
      a in mesh.axis_names for a in sharding_lib.BATCH_AXES):
    return 1
  return math.gcd(sharding_lib.num_batch_shards(mesh), rows)


def token_logps(model_cfg: Any, params: Any, hidden: jax.Array, targets: jax.Array,
                chunk_size: Any, where: Optional[jax.Array] = None) -> jax.Array:
  """Per-token log-probs [R, L] f32 of `targets`, chunked over the vocabulary head.

  `chunk_size` is an int or a `HeadOptions`. With `where` ([R, L] bool) and
  `HeadOptions.compact`, only those positions are computed (0 elsewhere, no gradient).
  """
  head = _head(chunk_size)
  kw = {"implementation": head.implementation} if head.implementation else {}
  chunk = head.chunk_size
  if where is not None and head.compact:
    kw.update(where=where, where_groups=_compaction_groups(hidden.shape[0]))
    chunk = head.compact_chunk_size
  return ops.token_logps_from_hidden(
      hidden, models.unembedding(model_cfg, params), targets, chunk_size=chunk,
      logit_softcap=model_cfg.final_logit_softcap, compute_dtype=model_cfg.jnp_dtype, **kw)


def sequence_logps(model_cfg: Any, params: Any, rows: dict[str, jax.Array], seq_ids: jax.Array,
                   num_seq: int, chunk_size: int, kernels: Optional[Any] = None
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`(hidden [R,L,D], sums [R, num_seq], counts [R, num_seq])` of response log-probs."""
  hidden = forward(model_cfg, params, rows, kernels=kernels)
  lp = token_logps(model_cfg, params, hidden, rows["targets"], chunk_size,
                   where=(rows["loss_mask"] > 0) & (seq_ids > 0))
  sums, counts = ops.segment_logps(lp, rows["loss_mask"], seq_ids, num_seq)
  return hidden, sums, counts


def pair_weights(batch: dict[str, jax.Array], layout: str, num_pairs: int) -> jax.Array:
  """[N] 1 for real pairs, 0 for empty packed slots."""
  if layout in ("packed", "prompt_shared"):
    return batch["pair_mask"].reshape(-1).astype(jnp.float32)
  return example_weights(batch, num_pairs)


def example_weights(batch: dict[str, jax.Array], n: int) -> jax.Array:
  """[n] ones, or the eval pipeline's `example_mask` (0 for filler rows of a last batch)."""
  if "example_mask" in batch:
    return batch["example_mask"].reshape(-1).astype(jnp.float32)
  return jnp.ones((n,), jnp.float32)


def last_token_index(seq_ids: jax.Array, num_seq: int) -> jax.Array:
  """[R, num_seq] position of the last token of each sequence (0 when absent)."""
  pos = jnp.arange(seq_ids.shape[-1], dtype=jnp.int32)
  onehot = seq_ids[..., None] == jnp.arange(1, num_seq + 1, dtype=seq_ids.dtype)  # [R,L,S]
  return jnp.max(jnp.where(onehot, pos[None, :, None], 0), axis=1)


def _sum(x: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
  x = jnp.asarray(x, jnp.float32)
  w = jnp.broadcast_to(w, x.shape).astype(jnp.float32)
  return jnp.sum(x * w), jnp.sum(w)


# ----------------------------------------------------------------------------- tasks


def _paired_logps(params: Any, ref_params: Optional[Any], batch: dict[str, jax.Array], *,
                  model_cfg: Any, layout: str, ref_mode: str, chunk_size: int,
                  kernels: Optional[Any] = None):
  """Policy (and reference) summed log-probs of every pair as `PairedLogps` [N], weights [N]."""
  rows, seq_ids, num_seq = flatten_rows(batch, layout)
  ref = None
  if ref_mode == "model":
    _, rsums, _ = sequence_logps(model_cfg, ref_params, rows, seq_ids, num_seq, chunk_size,
                                 kernels)
    ref = jax.lax.stop_gradient(rsums.reshape(-1, 2))
    # The reference pass runs to completion before the policy pass starts: left
    # independent, XLA:CPU interleaves the two and both slow down (measured 10.2 s vs
    # 8.5 s per bench_46m DPO step, docs/performance.md); on TPU it changes nothing.
    ref, params = jax.lax.optimization_barrier((ref, params))
  elif ref_mode == "precomputed":
    ref = batch["ref_logps"].reshape(-1, 2).astype(jnp.float32)
  _, sums, counts = sequence_logps(model_cfg, params, rows, seq_ids, num_seq, chunk_size,
                                   kernels)
  sums, counts = sums.reshape(-1, 2), counts.reshape(-1, 2)
  lp = losses_lib.PairedLogps(
      chosen=sums[:, 0], rejected=sums[:, 1],
      ref_chosen=None if ref is None else ref[:, 0],
      ref_rejected=None if ref is None else ref[:, 1],
      chosen_lengths=counts[:, 0], rejected_lengths=counts[:, 1])
  return lp, pair_weights(batch, layout, sums.shape[0])


def paired_stats(out: Any, lp: Any, w: jax.Array) -> Stats:
  """TRL-named per-pair statistics of a paired loss output."""
  c, r = out.chosen_rewards, out.rejected_rewards
  stats = {
      "rewards/chosen": _sum(c, w), "rewards/rejected": _sum(r, w),
      "rewards/margins": _sum(c - r, w), "rewards/accuracies": _sum(c > r, w),
      "logps/chosen": _sum(lp.chosen, w), "logps/rejected": _sum(lp.rejected, w),
  }
  for k, v in (getattr(out, "aux", None) or {}).items():
    v = jnp.asarray(v)
    if v.shape == w.shape:
      stats[f"aux/{k}"] = _sum(v, w)
    elif v.ndim == 0:
      stats[f"aux/{k}"] = (v.astype(jnp.float32), jnp.float32(1.0))
  return stats


def preference_loss(params, ref_params, batch, *, model_cfg, layout, ref_mode, chunk_size,
                    loss, loss_kwargs, kernels=None):
  """Any registered paired loss (DPO, IPO, SimPO, ...) on a pair layout."""
  lp, w = _paired_logps(params, ref_params, batch, model_cfg=model_cfg, layout=layout,
                        ref_mode=ref_mode, chunk_size=chunk_size, kernels=kernels)
  out = loss(lp, **loss_kwargs)
  loss_sum, n = _sum(out.loss, w)
  stats = {"loss": (loss_sum, n), **paired_stats(out, lp, w)}
  return loss_sum, stats


def reward_scores_at_last(params, batch, *, model_cfg, layout, kernels=None):
  """Reward-head scores [R, num_seq, H] read at the last real token of every sequence."""
  rows, seq_ids, num_seq = flatten_rows(batch, layout)
  idx = last_token_index(seq_ids, num_seq)  # [R, S]
  # Only these slots are read: the last layer runs its queries and MLP there alone, and the
  # head sees [R, S, D] (`models.forward_hidden(readout=...)`).
  h = forward(model_cfg, params, rows, readout=idx, kernels=kernels)  # [R, S, D]
  return models.reward_scores(model_cfg, params, h)  # [R, S, H]


def reward_loss(params, ref_params, batch, *, model_cfg, layout, chunk_size, loss_kwargs,
                kernels=None):
  """Bradley–Terry (optional margin, centring) or K-wise ranking loss on reward scores."""
  del ref_params, chunk_size
  kw = dict(loss_kwargs)
  kw.pop("beta", None)
  center = float(kw.pop("center_rewards_coefficient", 0.0) or 0.0)
  use_margin = bool(kw.pop("use_margin", False))
  if layout == "rankings":
    return _ranking_loss(params, batch, model_cfg=model_cfg, center=center, kw=kw,
                         kernels=kernels)
  scores = reward_scores_at_last(params, batch, model_cfg=model_cfg, layout=layout,
                                 kernels=kernels)
  scores = scores.reshape(-1, 2, scores.shape[-1])  # [N, 2, H]
  c, r = scores[:, 0], scores[:, 1]
  w = pair_weights(batch, layout, scores.shape[0])
  margin = batch.get("margin") if use_margin else None
  if margin is not None:
    margin = margin.reshape(-1)[:, None]
  per = losses_lib.bradley_terry(c, r, margin=margin).mean(-1)  # [N]
  if center:
    per = per + center * jnp.mean((c + r) ** 2, axis=-1)
  loss_sum, n = _sum(per, w)
  cm, rm = c.mean(-1), r.mean(-1)
  stats = {"loss": (loss_sum, n), "rewards/chosen": _sum(cm, w),
           "rewards/rejected": _sum(rm, w), "rewards/margins": _sum(cm - rm, w),
           "rewards/accuracies": _sum(cm > rm, w),
           "rewards/mean": _sum((cm + rm) / 2, w),
           "rewards/sq": _sum((cm ** 2 + rm ** 2) / 2, w)}
  return loss_sum, stats


def _ranking_loss(params, batch, *, model_cfg, center, kw, kernels=None):
  """K-wise ranking loss over [B, K] responses with `scores` labels."""
  scores = reward_scores_at_last(params, batch, model_cfg=model_cfg, layout="rankings",
                                 kernels=kernels)
  b, k = batch["scores"].shape
  s = scores.reshape(b, k, -1).mean(-1)  # [B, K]
  mask = batch["response_mask"].astype(jnp.float32)
  per = losses_lib.kwise_ranking(s, batch["scores"], mask, **kw)  # [B]
  if center:
    per = per + center * losses_lib_masked_mean_sq(s, mask)
  w = example_weights(batch, b)
  loss_sum, n = _sum(per, w)
  best = jnp.argmax(jnp.where(mask > 0, batch["scores"], -jnp.inf), axis=-1)
  top = jnp.argmax(jnp.where(mask > 0, s, -jnp.inf), axis=-1)
  stats = {"loss": (loss_sum, n), "rewards/accuracies": _sum(best == top, w),
           "rewards/mean": _sum(s, mask * w[:, None]),
           "rewards/sq": _sum(s ** 2, mask * w[:, None])}
  return loss_sum, stats


def losses_lib_masked_mean_sq(s: jax.Array, mask: jax.Array) -> jax.Array:
  return jnp.sum(s ** 2 * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0)


def sft_loss(params, ref_params, batch, *, model_cfg, chunk_size, kernels=None):
  """Token-mean negative log-likelihood of the response tokens."""
  del ref_params
  rows, _, _ = flatten_rows(batch, "sft")
  hidden = forward(model_cfg, params, rows, kernels=kernels)
  lp = token_logps(model_cfg, params, hidden, rows["targets"], chunk_size,
                   where=rows["loss_mask"] > 0)
  mask = rows["loss_mask"].astype(jnp.float32) * example_weights(batch, lp.shape[0])[:, None]
  loss_sum, n = _sum(-lp, mask)
  return loss_sum, {"loss": (loss_sum, n)}


def kto_loss(params, ref_params, batch, *, model_cfg, ref_mode, chunk_size, loss, loss_kwargs,
             kernels=None):
  """KTO / BCO on unpaired examples with the mismatched KL batch."""
  main = {k: batch[k] for k in _ROW_KEYS}
  kl = {k: batch["kl_" + k] for k in _ROW_KEYS if "kl_" + k in batch}
  both = {k: jnp.concatenate([main[k], kl[k]], 0) for k in main} if kl else main
  seq_ids = (both["segment_ids"] > 0).astype(both["segment_ids"].dtype)

  def seq(p):
    _, s, _ = sequence_logps(model_cfg, p, both, seq_ids, 1, chunk_size, kernels)
    return s[:, 0]

  pol = seq(params)
  ref = jax.lax.stop_gradient(seq(ref_params)) if ref_mode == "model" else None
  if ref is None:
    ref = jnp.concatenate([batch["ref_logps"].reshape(-1), batch["kl_ref_logps"].reshape(-1)])
  b = main["tokens"].shape[0]
  ul = losses_lib.UnpairedLogps(
      logps=pol[:b], ref_logps=ref[:b], label=batch["label"],
      kl_logps=pol[b:] if kl else None, kl_ref_logps=ref[b:] if kl else None)
  out = loss(ul, **loss_kwargs)
  ones = example_weights(batch, b)
  des = batch["label"].astype(jnp.float32) * ones
  loss_sum, n = _sum(out.loss, ones)
  stats = {"loss": (loss_sum, n), "rewards/chosen": _sum(out.rewards, des),
           "rewards/rejected": _sum(out.rewards, ones - des),
           "logps/chosen": _sum(pol[:b], des), "logps/rejected": _sum(pol[:b], ones - des)}
  for k, v in (out.aux or {}).items():
    if jnp.ndim(v) == 0:
      stats[f"aux/{k}"] = (jnp.asarray(v, jnp.float32), jnp.float32(1.0))
  return loss_sum, stats


def _eval_fn(loss_fn: LossFn) -> Callable[..., Stats]:
  def fn(params, ref_params, batch):
    _, stats = loss_fn(params, ref_params, batch)
    return stats
  return fn


def with_lora(task: Task, lcfg: Any, model_cfg: Any) -> Task:
  """`task` trained through LoRA adapters (Hu et al. 2021): `params` is the trainable tree of
  `lora.trainable_from` and `ref_params` the frozen base model, which is also the reference
  model, so the reference pass is the same forward on the base weights."""
  from prefjax.models import lora  # pylint: disable=g-import-not-at-top

  def through_adapters(fn):
    def wrapped(trainable, base, batch):
      policy = lora.apply(base, trainable, lcfg, model_cfg)
      return fn(policy, base if task.uses_ref_model else None, batch)
    return wrapped

  return Task(task.name, through_adapters(task.loss_fn), through_adapters(task.eval_fn),
              task.uses_ref_model)


def loss_kwargs_from_config(loss_config: Any, exclude: tuple[str, ...] = ("name",)) -> dict:
  """`config.loss` minus its `name` and unset (None) entries."""
  return {k: v for k, v in dict(loss_config).items() if k not in exclude and v is not None}


def make_task(name: str, *, model_cfg: Any, layout: str, loss_config: Any,
              ref_mode: str = "none", chunk_size: int = 128,
              kernels: Optional[Any] = None) -> Task:
  """Builds the task `name` (one of TASKS) for a batch layout and `config.loss`.

  `chunk_size`: an int or a `HeadOptions`; `kernels`: the `models.Kernels` every forward of
  the task runs with (None: the default backend's; the trainer resolves them from
  `config.kernels` and the mesh's platform).
  """
  if name == "sft":
    fn = functools.partial(sft_loss, model_cfg=model_cfg, chunk_size=chunk_size,
                           kernels=kernels)
    return Task(name, fn, _eval_fn(fn), False)
  if name == "reward":
    fn = functools.partial(reward_loss, model_cfg=model_cfg, layout=layout,
                           chunk_size=chunk_size, loss_kwargs=loss_kwargs_from_config(loss_config),
                           kernels=kernels)
    return Task(name, fn, _eval_fn(fn), False)
  if name == "preference":
    loss = losses_lib.get(loss_config.name)
    fn = functools.partial(preference_loss, model_cfg=model_cfg, layout=layout,
                           ref_mode=ref_mode, chunk_size=chunk_size, loss=loss,
                           loss_kwargs=loss_kwargs_from_config(loss_config), kernels=kernels)
    return Task(name, fn, _eval_fn(fn), ref_mode == "model")
  if name == "kto":
    loss = losses_lib.get_unpaired(loss_config.name)
    fn = functools.partial(kto_loss, model_cfg=model_cfg, ref_mode=ref_mode,
                           chunk_size=chunk_size, loss=loss,
                           loss_kwargs=loss_kwargs_from_config(loss_config), kernels=kernels)
    return Task(name, fn, _eval_fn(fn), ref_mode == "model")
  raise ValueError(f"unknown training task {name!r}; expected one of {TASKS}")
