"""One validating pass over the records: parse every record once, apply the bad-record policy,
the identical-pair drop and the deterministic train/eval split, and return the list of usable
items `(record index, sub item)` that the grain pipeline then reads by random access.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Sequence

import numpy as np

from prefjax.data import formats
from prefjax.data.errors import BadRecord, DataError, DropStats, handle_bad
from prefjax.data.sources import RecordSource, expand_paths, open_file


@dataclasses.dataclass
class Index:
  source: RecordSource
  items: np.ndarray          # int64 [N, 2]: (record index, sub item)
  stats: DropStats
  num_records: int
  has_margin: bool
  max_responses: int


def split_value(text: str) -> float:
  """A stable value in [0, 1) from a hash of the first human turn (the split key)."""
  return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(),
                        "big") / 2.0**64


def in_split(ex: formats.Example, part: str | None, fraction: float | None) -> bool:
  if part is None or fraction is None or fraction >= 1.0:
    return True
  u = split_value(ex.first_user_turn())
  return u < fraction if part == "train" else u >= fraction


def _open_files(paths: Sequence[str], policy: str, stats: DropStats) -> list:
  files = []
  for p in paths:
    try:
      files.append(open_file(p))
    except DataError as e:
      if e.reason == "missing_path":
        raise
      handle_bad(e, policy, stats)
  return files


def parse_item(source: RecordSource, index: int, fmt: str, kind: str) -> formats.Example:
  """Reads and parses record `index`; malformed input raises `DataError` with file and line."""
  f, i = source.locate(index)
  try:
    ex = formats.parse(f.read(i), fmt)
    if ex.kind != kind:
      ex = formats.to_kind(ex, kind, 0)
  except BadRecord as e:
    raise DataError(e.reason, e.detail, path=f.path, location=f.location(i), field=e.field) from None
  return ex


def build_index(spec: str | Sequence[str], *, fmt: str = "auto", kind: str = "pairs",
                policy: str = "error", part: str | None = None,
                fraction: float | None = None) -> Index:
  """Validates all records of `spec` (paths / globs); see module docstring."""
  if policy not in ("error", "skip"):
    raise ValueError(f"data.on_bad_record must be 'error' or 'skip', got {policy!r}")
  paths = expand_paths(spec)
  stats = DropStats()
  source = RecordSource(_open_files(paths, policy, stats))
  items, has_margin, max_k = [], False, 0
  for index in range(len(source)):
    try:
      ex = parse_item(source, index, fmt, kind)
    except DataError as e:
      handle_bad(e, policy, stats)
      continue
    if not in_split(ex, part, fraction):
      continue
    if ex.kind == "pairs" and ex.responses[0] == ex.responses[1]:
      path, loc = source.where(index)
      stats.add("identical", f"{path} {loc}")
      continue
    has_margin |= ex.margin is not None
    max_k = max(max_k, len(ex.responses))
    raw = formats.parse(source[index], fmt) if kind == "unpaired" else ex
    items.extend((index, sub) for sub in range(formats.num_items(raw, kind)))
  if not items:
    raise DataError("no_usable_records", f"no usable {kind} records"
                    f"{' in the ' + part + ' split' if part and fraction else ''} "
                    f"(dropped: {dict(stats.counts) or 'none'})", path=", ".join(paths))
  return Index(source, np.asarray(items, np.int64).reshape(-1, 2), stats, len(source),
               has_margin, max_k)
