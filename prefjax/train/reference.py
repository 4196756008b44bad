"""Precomputed reference log-probs (`config.reference.mode = "precomputed"`).

Before training, one sharded pass of the reference model over the training (and eval)
batches computes every example's summed reference log-probs. They are stored on disk
keyed by the content of each example (a hash of its token arrays), in a folder named by
the dataset and reference checkpoint, so later runs (and resumed runs) reuse them. The
reference model is then dropped from memory and batches carry `ref_logps`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Callable, Iterator, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from prefjax import sharding as sharding_lib
from prefjax.train import tasks as tasks_lib

_KEY_FIELDS = ("tokens", "loss_mask", "segment_ids", "branch_ids")


def row_keys(batch: dict[str, np.ndarray]) -> list[str]:
  """One content hash per leading row of a (per-process, numpy) batch."""
  n = np.shape(batch["tokens"])[0]
  keys = []
  for i in range(n):
    h = hashlib.blake2b(digest_size=16)
    for k in _KEY_FIELDS:
      if k in batch:
        a = np.ascontiguousarray(batch[k][i])
        h.update(k.encode() + str(a.shape).encode() + a.tobytes())
    keys.append(h.hexdigest())
  return keys


def cache_dir(root: str, fingerprint: dict[str, Any]) -> str:
  """`root/<hash of the dataset + reference fingerprint>` (the fingerprint is saved beside)."""
  digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
  return os.path.join(root, digest)


class RefLogpsCache:
  """Key -> reference log-probs of one row ([2] for a pair, [S, 2] for a packed row)."""

  def __init__(self, directory: str, fingerprint: Optional[dict] = None):
    self.directory = directory
    self.fingerprint = fingerprint or {}
    self.table: dict[str, np.ndarray] = {}
    self._dirty = False

  def load(self) -> "RefLogpsCache":
    """Reads every `part_*.npz` in the folder (written by any run and process)."""
    if not os.path.isdir(self.directory):
      return self
    for name in sorted(os.listdir(self.directory)):
      if name.startswith("part_") and name.endswith(".npz"):
        with np.load(os.path.join(self.directory, name)) as z:
          for k, v in zip(z["keys"], z["values"]):
            self.table[str(k)] = v
    return self

  def has_all(self, keys: list[str]) -> bool:
    return all(k in self.table for k in keys)

  def add(self, keys: list[str], values: np.ndarray) -> None:
    for k, v in zip(keys, values):
      self.table[k] = np.asarray(v, np.float32)
    self._dirty = True

  def lookup(self, keys: list[str]) -> np.ndarray:
    missing = [k for k in keys if k not in self.table]
    if missing:
      raise KeyError(f"{len(missing)} example(s) have no precomputed reference log-probs in "
                     f"{self.directory}; delete that folder to recompute")
    return np.stack([self.table[k] for k in keys])

  def save(self, tag: str) -> None:
    """Writes this process's table as `part_<tag>.npz` (atomically)."""
    if not self._dirty:
      return
    os.makedirs(self.directory, exist_ok=True)
    keys = np.array(sorted(self.table))
    values = np.stack([self.table[k] for k in keys]) if len(keys) else np.zeros((0, 2))
    tmp = os.path.join(self.directory, f".part_{tag}.tmp.npz")
    np.savez(tmp, keys=keys, values=values)
    os.replace(tmp, os.path.join(self.directory, f"part_{tag}.npz"))
    with open(os.path.join(self.directory, "fingerprint.json"), "w", encoding="utf-8") as f:
      json.dump(self.fingerprint, f, indent=1, sort_keys=True)
    self._dirty = False


def make_ref_fn(model_cfg: Any, layout: str, chunk_size: Any, param_sh: Any, mesh: Mesh,
                kernels: Any = None) -> Callable:
  """Jitted `(ref_params, batch) -> [rows, ..., 2]` summed reference log-probs, row-sharded.

  `chunk_size`: an int or a `tasks.HeadOptions`; `kernels`: `models.Kernels` (None: the
  default backend's)."""
  def fn(params, batch):
    rows, seq_ids, num_seq = tasks_lib.flatten_rows(batch, layout)
    _, sums, _ = tasks_lib.sequence_logps(model_cfg, params, rows, seq_ids, num_seq, chunk_size,
                                          kernels)
    lead = batch["tokens"].shape[0]
    out = sums.reshape(lead, -1, 2)
    return out[:, 0] if layout not in ("packed", "prompt_shared") else out
  return jax.jit(fn, in_shardings=(param_sh, None),
                 out_shardings=sharding_lib.batch_sharding(mesh, 2 if layout not in (
                     "packed", "prompt_shared") else 3))


def precompute(cache: RefLogpsCache, ref_fn: Callable, ref_params: Any,
               batches: Iterator[dict[str, np.ndarray]], mesh: Mesh, *,
               num_batches: int) -> int:
  """Runs `ref_fn` over up to `num_batches` batches not yet in the cache; returns how many."""
  done = 0
  for i, local in enumerate(batches):
    if i >= num_batches:
      break
    keys = row_keys(local)
    if _all_processes_agree(cache.has_all(keys)):
      continue
    glob = sharding_lib.make_global_batch(_model_inputs(local), mesh)
    out = ref_fn(ref_params, glob)
    spec = out.sharding.spec
    local_out = multihost_utils.global_array_to_host_local_array(out, mesh, spec)
    cache.add(keys, np.asarray(local_out))
    done += 1
  logging.info("precomputed reference log-probs for %d batches into %s", done, cache.directory)
  return done


def _all_processes_agree(flag: bool) -> bool:
  """True when `flag` holds on every process (so all of them skip a batch together)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.all(multihost_utils.process_allgather(np.array(flag))))


def _model_inputs(local: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  keys = ("tokens", "targets", "loss_mask", "positions", "segment_ids", "branch_ids",
          "pair_mask")
  return {k: v for k, v in local.items() if k in keys}


def attach(local: dict[str, np.ndarray], cache: RefLogpsCache) -> dict[str, np.ndarray]:
  """Adds `ref_logps` to a per-process batch from the cache."""
  out = dict(local)
  out["ref_logps"] = cache.lookup(row_keys(local)).astype(np.float32)
  return out
