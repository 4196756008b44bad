"""Packed layouts on grain's first-fit packer (no pair is split across rows).

packed:        pair p of a row = chosen (segment 2p+1) then rejected (segment 2p+2).
prompt_shared: pair p = shared prompt[:-1] (branch 0), then [prompt[-1]] + chosen (branch 1),
               then [prompt[-1]] + rejected (branch 2), all in segment p+1; both branches start at
               position len(prompt)-1, so each response's first token is predicted inside its own
               branch (the shared part holds every prompt token except the last).
"""
from __future__ import annotations

from typing import Sequence

import grain
import numpy as np

from prefjax.data.tokenize import sequence

_META = ("targets", "loss_mask", "positions", "sub")


def packed_features(prompt: Sequence[int], responses: Sequence[Sequence[int]]) -> dict:
  """A pair as one packable element; `sub` is 1 (chosen) / 2 (rejected) per token."""
  seqs = [sequence(prompt, r) for r in responses]
  out = {k: np.concatenate([s[k] for s in seqs]) for k in ("tokens", "targets", "loss_mask",
                                                             "positions")}
  out["sub"] = np.concatenate([np.full(len(s["tokens"]), k + 1, np.int32)
                               for k, s in enumerate(seqs)])
  return out


def prompt_shared_features(prompt: Sequence[int], responses: Sequence[Sequence[int]]) -> dict:
  """A pair as shared prompt[:-1] + one branch per response; `sub` holds branch ids."""
  prompt = list(prompt)
  shared = sequence(prompt, [])  # targets of the shared part: next prompt tokens
  n = len(prompt) - 1
  parts = [{k: v[:n] for k, v in shared.items()}]
  subs = [np.zeros(n, np.int32)]
  for k, r in enumerate(responses):
    s = sequence(prompt[-1:], r)
    s["positions"] = s["positions"] + n
    parts.append(s)
    subs.append(np.full(len(s["tokens"]), k + 1, np.int32))
  out = {k: np.concatenate([p[k] for p in parts]) for k in ("tokens", "targets", "loss_mask",
                                                              "positions")}
  out["sub"] = np.concatenate(subs)
  return out


def pack(ds: grain.IterDataset, *, length: int, num_bins: int, max_pairs_per_row: int,
         seed: int, shuffle_bins: bool) -> grain.IterDataset:
  """First-fit packs elements of `packed_features`/`prompt_shared_features` into rows."""
  keys = ("tokens",) + _META
  return grain.experimental.FirstFitPackIterDataset(
      ds, length_struct={k: length for k in keys}, num_packing_bins=num_bins, seed=seed,
      shuffle_bins=shuffle_bins, meta_features=_META, max_sequences_per_bin=max_pairs_per_row)


def collate_rows(rows: Sequence[dict], *, num_rows: int, max_pairs_per_row: int,
                 shared: bool, length: int | None = None) -> dict:
  """Stacks packed rows into [R, L] arrays (+ pair_mask [R, S]); missing rows are padding.

  `length` is read off the first row; give it when `rows` may be empty."""
  length = len(rows[0]["tokens"]) if rows else int(length)
  out = {k: np.zeros((num_rows, length), np.float32 if k == "loss_mask" else np.int32)
         for k in ("tokens", "targets", "loss_mask", "positions", "segment_ids")}
  if shared:
    out["branch_ids"] = np.zeros((num_rows, length), np.int32)
  out["pair_mask"] = np.zeros((num_rows, max_pairs_per_row), np.float32)
  for i, row in enumerate(rows):
    pair = row["tokens_segment_ids"]  # 1.. per packed pair, 0 = padding
    real = pair > 0
    for k in ("tokens", "targets", "loss_mask", "positions"):
      out[k][i] = np.where(real, row[k], 0)
    if shared:
      out["segment_ids"][i] = pair
      out["branch_ids"][i] = np.where(real, row["sub"], 0)
    else:
      out["segment_ids"][i] = np.where(real, 2 * (pair - 1) + row["sub"], 0)
    out["pair_mask"][i, :int(pair.max())] = 1.0
  return out
