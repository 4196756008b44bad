"""Optax optimizer: AdamW with a weight-decay mask, LR schedules, clipping.

Gradient accumulation is not an optax wrapper here: the train step scans over
micro-batches itself (see `prefjax.train.step`), so the optimizer sees one
already-averaged gradient per step.
"""
from __future__ import annotations

from typing import Any

import jax
import optax

SCHEDULES = ("cosine", "linear", "constant")

# Leaf names never decayed: norm scales and biases.
_NO_DECAY_LEAVES = ("scale", "b", "bias")


def make_schedule(optim: Any, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `optim.learning_rate`, then cosine / linear decay or constant.

  Decays reach `learning_rate * optim.min_lr_ratio` at `total_steps`.
  """
  lr = float(optim.learning_rate)
  warmup = int(optim.get("warmup_steps", 0))
  name = optim.get("schedule", "cosine")
  end = lr * float(optim.get("min_lr_ratio", 0.0))
  decay_steps = max(1, int(total_steps) - warmup)
  if name == "cosine":
    decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr if lr else 0.0)
  elif name == "linear":
    decay = optax.linear_schedule(lr, end, decay_steps)
  elif name == "constant":
    decay = optax.constant_schedule(lr)
  else:
    raise ValueError(f"unknown optim.schedule {name!r}; expected one of {SCHEDULES}")
  if warmup <= 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def decay_mask(params: Any, decay_embeddings: bool = False) -> Any:
  """True for leaves that get weight decay: matrices, not norms / biases / embeddings."""
  def keep(path, _):
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    if names and names[-1] in _NO_DECAY_LEAVES:
      return False
    if not decay_embeddings and any("embedder" in n or "embedding" in n for n in names):
      return False
    return True
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(optim: Any, total_steps: int) -> tuple[optax.GradientTransformation,
                                                          optax.Schedule]:
  """Returns `(tx, schedule)`: [clip by global norm ->] AdamW with masked decay."""
  schedule = make_schedule(optim, total_steps)
  adamw = optax.adamw(
      learning_rate=schedule,
      b1=float(optim.get("b1", 0.9)),
      b2=float(optim.get("b2", 0.999)),
      eps=float(optim.get("eps", 1e-8)),
      weight_decay=float(optim.get("weight_decay", 0.0)),
      mask=lambda p: decay_mask(p, bool(optim.get("decay_embeddings", False))),
  )
  clip = float(optim.get("grad_clip", 0.0) or 0.0)
  tx = optax.chain(optax.clip_by_global_norm(clip), adamw) if clip > 0 else adamw
  return tx, schedule
