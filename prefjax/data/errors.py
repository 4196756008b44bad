"""Bad-input handling: one clear `DataError`, or skip-and-count under an explicit policy."""
from __future__ import annotations

import collections
import dataclasses

from absl import logging

# Reasons that are policies, not errors: dropped and counted under both policies.
POLICY_DROPS = ("identical", "identical_after_truncation", "tie")


class DataError(ValueError):
  """A malformed input: the message names the file, the line (or row) and the field."""

  def __init__(self, reason: str, detail: str, *, path: str | None = None,
               location: str | None = None, field: str | None = None):
    self.reason, self.detail = reason, detail
    self.path, self.location, self.field = path, location, field
    where = path or "<data>"
    if location:
      where += f", {location}"
    what = f"field {field!r}: " if field else ""
    super().__init__(f"{where}: {what}{detail} [{reason}]")

  def __reduce__(self):  # crosses process boundaries (grain workers) intact
    return (_rebuild_data_error, (self.reason, self.detail, self.path, self.location,
                                  self.field))


def _rebuild_data_error(reason, detail, path, location, field) -> "DataError":
  return DataError(reason, detail, path=path, location=location, field=field)


class BadRecord(Exception):
  """Raised by format adapters for one record; the reader adds file and line."""

  def __init__(self, reason: str, detail: str, field: str | None = None):
    super().__init__(detail)
    self.reason, self.detail, self.field = reason, detail, field


@dataclasses.dataclass
class DropStats:
  """Counts of skipped / dropped records by reason, with the first few locations."""
  counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  examples: dict = dataclasses.field(default_factory=dict)
  max_examples: int = 5

  def add(self, reason: str, where: str = "") -> None:
    self.counts[reason] += 1
    locs = self.examples.setdefault(reason, [])
    if where and len(locs) < self.max_examples:
      locs.append(where)

  def merge(self, other: "DropStats") -> None:
    for reason, n in other.counts.items():
      self.counts[reason] += n
      for loc in other.examples.get(reason, []):
        if len(self.examples.setdefault(reason, [])) < self.max_examples:
          self.examples[reason].append(loc)

  def total(self) -> int:
    return sum(self.counts.values())

  def as_dict(self) -> dict:
    return {"counts": dict(self.counts), "first_locations": dict(self.examples)}

  def log(self, name: str) -> None:
    if not self.counts:
      return
    parts = ", ".join(f"{r}={n}" for r, n in sorted(self.counts.items()))
    logging.warning("data %s: dropped/skipped records: %s", name, parts)
    for reason, locs in sorted(self.examples.items()):
      logging.warning("  %s: first at %s", reason, "; ".join(locs))


def handle_bad(err: DataError, policy: str, stats: DropStats) -> None:
  """Raises `err` under policy "error"; counts it under "skip"."""
  if policy == "error" and err.reason not in POLICY_DROPS:
    raise DataError(err.reason, err.detail + " (set data.on_bad_record='skip' to skip and count"
                    " such records)", path=err.path, location=err.location, field=err.field) from None
  if policy not in ("error", "skip"):
    raise ValueError(f"data.on_bad_record must be 'error' or 'skip', got {policy!r}")
  where = err.path or ""
  if err.location:
    where += f" {err.location}"
  stats.add(err.reason, where)
