"""`score_pairs_fn`s from a model: explicit reward-model scores and implicit rewards.

Both return functions `batch -> (chosen [N], rejected [N])` for `runner.evaluate_sets`,
jitted once per batch structure, with the params passed as arguments (not baked in as
constants). They accept every pair layout of `prefjax.data` (docs/internals.md):

  padded         [B, 2, L] keys               -> scores [B]
  packed         [R, L] keys + pair_mask [R,S] -> scores [R, S] (chosen seg 2p+1, rej 2p+2)
  prompt_shared  packed + branch_ids [R, L]   -> scores [R, S] (seq 2(seg−1) + branch)

Sequence numbering matches the trainer (`prefjax.train.tasks.flatten_rows`), so the eval
sees the same scores the training metrics see.

  explicit RM   score(x, y) = reward head at the last token of the sequence (the trainer's
                `reward_scores_at_last`; Ouyang et al. 2022, Sec. 3.5)
  implicit RM   `prefjax.eval.implicit.implicit_reward(method, ...)` on summed response
                log-probs of the policy (and of the reference model for the DPO family),
                computed in vocabulary chunks (`prefjax.ops.token_logps_from_hidden`)

For multi-host / sharded evaluation, jit these under the run's mesh with the trainer's
batch shardings; on one host they run as they are.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from prefjax.eval import implicit as implicit_lib

_ROW_KEYS = ("tokens", "targets", "loss_mask", "positions", "segment_ids", "branch_ids")


def _rows(batch: dict) -> tuple[dict, jnp.ndarray, int, tuple[int, ...]]:
  """(rows [R', L], sequence ids [R', L] (0 = none), num_seq per row, pair-slot shape).

  Padded [B, 2, L] becomes 2B rows of one sequence each (ids 1 on real tokens).
  """
  rows = {k: jnp.asarray(batch[k]) for k in _ROW_KEYS if k in batch}
  seg = rows["segment_ids"]
  if seg.ndim == 3:  # padded pairs
    b = seg.shape[0]
    rows = {k: v.reshape(-1, v.shape[-1]) for k, v in rows.items()}
    return rows, (rows["segment_ids"] > 0).astype(jnp.int32), 1, (b,)
  if "pair_mask" not in batch:
    raise ValueError("a packed / prompt-shared batch needs `pair_mask` [R, S]")
  slots = tuple(batch["pair_mask"].shape)
  if "branch_ids" in rows:
    br = rows["branch_ids"]
    ids = jnp.where((br > 0) & (seg > 0), 2 * (seg - 1) + br, 0)
  else:
    ids = seg
  return rows, ids.astype(jnp.int32), 2 * slots[1], slots


def _hidden(model_cfg: Any, params: Any, rows: dict, readout: Any = None,
            kernels: Any = None) -> jnp.ndarray:
  from prefjax import models  # pylint: disable=import-outside-toplevel
  return models.forward_hidden(model_cfg, params, rows["tokens"],
                               segment_ids=rows["segment_ids"], positions=rows["positions"],
                               branch_ids=rows.get("branch_ids"), readout=readout,
                               kernels=kernels)


def _pairs(x: jnp.ndarray, slots: tuple[int, ...]) -> tuple[jnp.ndarray, jnp.ndarray]:
  """[R', num_seq] per-sequence values -> (chosen, rejected) of `slots` shape."""
  x = x.reshape(slots + (2,))
  return x[..., 0], x[..., 1]


def last_token_scores(model_cfg: Any, params: Any, batch: dict, *, head: int = 0,
                      kernels: Any = None) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Reward head `head` at the last token of each sequence: (chosen, rejected) [slots]."""
  from prefjax import models  # pylint: disable=import-outside-toplevel
  rows, ids, num_seq, slots = _rows(batch)
  pos = jnp.arange(ids.shape[-1], dtype=jnp.int32)
  onehot = ids[..., None] == jnp.arange(1, num_seq + 1, dtype=jnp.int32)  # [R', L, S']
  last = jnp.max(jnp.where(onehot, pos[None, :, None], 0), axis=1)        # [R', S']
  h = _hidden(model_cfg, params, rows, readout=last, kernels=kernels)  # [R', S', D]
  scores = models.reward_scores(model_cfg, params, h)[..., head]  # [R', S']
  return _pairs(scores, slots)


def sequence_logps(model_cfg: Any, params: Any, batch: dict, *, chunk_size: int = 128,
                   kernels: Any = None
                   ) -> tuple[tuple[jnp.ndarray, jnp.ndarray], tuple[jnp.ndarray, jnp.ndarray]]:
  """((chosen, rejected) summed response log-probs, (chosen, rejected) token counts)."""
  from prefjax import models, ops  # pylint: disable=import-outside-toplevel
  rows, ids, num_seq, slots = _rows(batch)
  hidden = _hidden(model_cfg, params, rows, kernels=kernels)
  # Only response positions are scored (`where`), in chunks of 4x the row chunk.
  lp = ops.token_logps_from_hidden(hidden, models.unembedding(model_cfg, params), rows["targets"],
                                   chunk_size=4 * chunk_size,
                                   logit_softcap=model_cfg.final_logit_softcap,
                                   where=(rows["loss_mask"] > 0) & (ids > 0))
  sums, counts = ops.segment_logps(lp, rows["loss_mask"], ids, num_seq)
  return _pairs(sums, slots), _pairs(counts, slots)


def _host_batch(batch: dict) -> dict:
  keep = _ROW_KEYS + ("pair_mask",)
  return {k: v for k, v in batch.items() if k in keep}


def reward_score_fn(model_cfg: Any, params: Any, *, head: int = 0, kernels: Any = None
                    ) -> Callable[[dict], tuple[jax.Array, jax.Array]]:
  """`score_pairs_fn` of an explicit reward model (`model_cfg.num_reward_heads > 0`).

  Args:
    model_cfg: `prefjax.models.ModelConfig` of the reward model.
    params: its params (with `reward_head`).
    head: which reward head to read (multi-objective RMs).
    kernels: `prefjax.models.Kernels` (None: the default backend's).
  """
  fn = jax.jit(lambda p, b: last_token_scores(model_cfg, p, b, head=head, kernels=kernels))
  return lambda batch: fn(params, _host_batch(batch))


def implicit_score_fn(model_cfg: Any, params: Any, ref_params: Optional[Any] = None, *,
                      method: str = "dpo", beta: float = 0.1, chunk_size: int = 128,
                      kernels: Any = None) -> Callable[[dict], tuple[jax.Array, jax.Array]]:
  """`score_pairs_fn` of a policy's implicit reward (`implicit.implicit_reward`).

  Args:
    model_cfg: `prefjax.models.ModelConfig` of the policy (and reference: same architecture).
    params: policy params.
    ref_params: reference params; required by the DPO family, unused by SimPO/CPO/ORPO/RRHF.
    method: implicit-reward definition (`implicit.METHOD_KIND` key, e.g. "dpo", "simpo").
    beta: the β the policy was trained with.
    chunk_size: vocabulary-head chunk of `ops.token_logps_from_hidden`.
    kernels: `prefjax.models.Kernels` (None: the default backend's).
  """
  kind = implicit_lib.METHOD_KIND.get(method)
  if kind is None:
    raise ValueError(f"no implicit reward defined for {method!r}")
  needs_ref = kind == "ref"
  if needs_ref and ref_params is None:
    raise ValueError(f"the implicit reward of {method!r} needs ref_params")

  def score(p, rp, b):
    (c, r), (lc, lr) = sequence_logps(model_cfg, p, b, chunk_size=chunk_size, kernels=kernels)
    rc = rr = None
    if needs_ref:
      (rc, rr), _ = sequence_logps(model_cfg, rp, b, chunk_size=chunk_size, kernels=kernels)
    return (implicit_lib.implicit_reward(method, c, ref_logps=rc, lengths=lc, beta=beta),
            implicit_lib.implicit_reward(method, r, ref_logps=rr, lengths=lr, beta=beta))

  fn = jax.jit(score)
  return lambda batch: fn(params, ref_params if needs_ref else None, _host_batch(batch))
