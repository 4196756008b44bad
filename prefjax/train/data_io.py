"""The trainer's side of `prefjax.data`: which pipeline a task reads, step counts, tokens."""
from __future__ import annotations

import copy
import os
from typing import Any

import jax
import numpy as np

from prefjax import data as data_lib
from prefjax.train import reference as ref_lib
from prefjax.train import validation

# Batch keys the jitted step consumes (the rest of a batch stays on the host).
MODEL_KEYS = ("tokens", "targets", "loss_mask", "positions", "segment_ids", "branch_ids",
              "pair_mask", "margin", "example_mask", "label", "scores", "response_mask",
              "ref_logps", "kl_tokens", "kl_targets", "kl_loss_mask", "kl_positions",
              "kl_segment_ids", "kl_ref_logps")

TASK_KINDS = {"sft": "sft", "kto": "unpaired", "preference": "pairs"}


def data_config(config: Any) -> Any:
  """`config.data` with `kind` forced by the task (reward keeps pairs or rankings)."""
  d = copy.deepcopy(config.data)
  kind = TASK_KINDS.get(config.task)
  if kind is not None and d.get("kind") != kind:
    with d.unlocked():
      d.kind = kind
  return d


def layout(config: Any) -> str:
  """Batch layout the task's loss reads: padded | packed | prompt_shared | sft | unpaired | rankings."""
  d = data_config(config)
  if d.kind in ("sft", "unpaired", "rankings"):
    return d.kind
  return data_lib.config.get(d, "layout")


def load_tokenizer(config: Any) -> Any:
  return data_lib.load_tokenizer(data_lib.config.get(config.data, "tokenizer"))


def pipeline(config: Any, tokenizer: Any, split: str) -> Any:
  """This process's checkpointable iterator of local numpy batches for `split`."""
  return data_lib.make_pipeline(
      data_config(config), tokenizer, split=split, process_index=jax.process_index(),
      process_count=jax.process_count(), seed=int(config.seed))


def has_eval(config: Any) -> bool:
  d = config.data
  frac = data_lib.config.get(d, "split_fraction")
  return d.get("eval") is not None or (frac is not None and float(frac) < 1.0)


def total_steps(config: Any, tokenizer: Any) -> int:
  """`config.total_steps`, or `num_epochs` passes over the training split."""
  if int(config.get("total_steps", 0) or 0) > 0:
    return int(config.total_steps)
  epochs = float(config.get("num_epochs", 0) or 0)
  if epochs <= 0:
    raise validation.ConfigError("set config.total_steps > 0 or config.num_epochs > 0")
  if layout(config) in ("packed", "prompt_shared"):
    raise validation.ConfigError("config.num_epochs needs a padded layout (packed rows per "
                                 "epoch are not known ahead); set config.total_steps")
  it = pipeline(config, tokenizer, "train")
  per_epoch = it.info.local_items // it.info.local_batch_size
  it.close()
  return max(1, int(epochs * per_epoch))


def model_inputs(local: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {k: v for k, v in local.items() if k in MODEL_KEYS}


def real_tokens(local: dict[str, np.ndarray]) -> int:
  """Non-padding tokens in a local batch (for tokens/s)."""
  n = int(np.sum(np.asarray(local["segment_ids"]) > 0))
  if "kl_segment_ids" in local:
    n += int(np.sum(np.asarray(local["kl_segment_ids"]) > 0))
  return n


def ref_cache(config: Any, workdir: str) -> ref_lib.RefLogpsCache:
  """The precomputed-reference cache for this dataset + reference checkpoint."""
  d = data_config(config)
  fingerprint = {
      "data": {k: _plain(d.get(k)) for k in (
          "train", "eval", "format", "kind", "layout", "max_len", "max_prompt_len",
          "max_response_len", "max_pairs_per_row", "chat_template", "tokenizer",
          "split_fraction")},
      "reference": _plain(config.reference.get("init") or config.model.init) or {
          "random_init": {"preset": config.model.preset, "seed": int(config.seed),
                          **{k: _plain(v) for k, v in dict(config.model).items()}}},
  }
  root = config.reference.get("cache_dir") or os.path.join(workdir, "ref_logps")
  return ref_lib.RefLogpsCache(ref_lib.cache_dir(root, fingerprint), fingerprint)


def _plain(v: Any) -> Any:
  if hasattr(v, "to_dict"):
    return v.to_dict()
  if isinstance(v, (list, tuple)):
    return [_plain(x) for x in v]
  return v
