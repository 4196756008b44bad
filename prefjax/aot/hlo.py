"""Collectives of a compiled XLA program, read from its HLO text.

Counts every all-gather, reduce-scatter, all-reduce, all-to-all and collective-permute
(synchronous or `-start` of an async pair) per step: an op inside a `while` body counts
once per iteration (the trip count from XLA's `known_trip_count` annotation, or else from the
loop condition's `i < N` against a constant, as scans compile), an op inside a conditional
branch counts once. Bytes are the larger of the op's operand and
result buffers on one device (the gathered / un-scattered size): the volume one chip
sends or receives is within a small factor of it, depending on the algorithm.
"""
from __future__ import annotations

import collections
import re
from typing import Iterable

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
                "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1}
_SHAPE = re.compile(r"\b(" + "|".join(sorted(_DTYPE_BYTES, key=len, reverse=True))
                    + r")\[([\d,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\{\s*$")
_OP = re.compile(r"=\s*.*?\b(" + "|".join(KINDS) + r")(-start)?\(")
_WHILE = re.compile(r"\bwhile\(.*\bcondition=%?([\w.\-]+).*\bbody=%?([\w.\-]+)")
_LIMIT = re.compile(r"= s32\[\][^=]*\bconstant\((\d+)\)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CALLS = re.compile(r"\b(?:calls|branch_computations|true_computation|false_computation)="
                    r"\{?([^}]*?)\}?(?:,\s|$)")


def _bytes(segment: str) -> int:
  best = 0
  for dtype, dims in _SHAPE.findall(segment):
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    best = max(best, n * _DTYPE_BYTES[dtype])
  return best


def _computations(text: str) -> tuple[dict[str, list[str]], str]:
  comps: dict[str, list[str]] = {}
  entry, name = "", None
  for line in text.splitlines():
    m = _HEADER.match(line)
    if m:
      name = m.group(1)
      comps[name] = []
      if line.startswith("ENTRY"):
        entry = name
    elif line.strip() == "}":
      name = None
    elif name is not None:
      comps[name].append(line)
  return comps, entry


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """`{kind: {"count": n, "bytes": b}}` per step for every kind in KINDS (zeros included)."""
  comps, entry = _computations(hlo_text)
  memo: dict[str, collections.Counter] = {}

  def total(name: str, depth: int = 0) -> collections.Counter:
    if name in memo:
      return memo[name]
    out: collections.Counter = collections.Counter()
    if depth > 64 or name not in comps:
      return out
    for line in comps[name]:
      op = _OP.search(line)
      if op:
        meta = line.split(", replica_groups=")[0].split(", channel_id=")[0]
        out[op.group(1) + "/count"] += 1
        out[op.group(1) + "/bytes"] += _bytes(meta.split(" metadata=")[0])
        continue
      loop = _WHILE.search(line)
      if loop:
        trip = _trip_count(line, comps.get(loop.group(1), []))
        for k, v in total(loop.group(2), depth + 1).items():
          out[k] += v * trip
        continue
      for group in _CALLS.findall(line):
        for callee in _names(group):
          for k, v in total(callee, depth + 1).items():
            out[k] += v
    memo[name] = out
    return out

  found = total(entry) if entry else collections.Counter()
  return {k: {"count": int(found[k + "/count"]), "bytes": int(found[k + "/bytes"])}
          for k in KINDS}


def _trip_count(while_line: str, condition: list[str]) -> int:
  """Iterations of a while loop: XLA's annotation, or the N of a condition `i < N`."""
  known = _TRIP.search(while_line)
  if known:
    return int(known.group(1))
  if any("direction=LT" in line for line in condition):
    limits = [int(m.group(1)) for line in condition for m in [_LIMIT.search(line)] if m]
    if len(limits) == 1:
      return limits[0]
  return 1


def _names(group: str) -> Iterable[str]:
  return [n.strip().lstrip("%") for n in group.split(",") if n.strip()]
