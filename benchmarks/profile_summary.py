r"""Where a traced XLA:CPU step spends its time: per op and per part of the model.

Joins a `jax.profiler` Perfetto trace (the thunk events of XLA:CPU's worker threads) with the
optimised HLO text of the same executable (`--xla_dump_to`, which `train_step.py
--profile-dir` turns on), and prints for every op its total time, call count, the FLOPs of
the dots it contains and the GFLOP/s it reached, then the same summed over the parts of the
model named in the ops' metadata (MLP, vocabulary head, attention projections, ...).

  python benchmarks/train_step.py --tasks simpo --layouts padded --batch 1 --prompt-len 64 \
      --min-response 960 --max-response 960 --scan-layers --profile-dir /tmp/prof
  python benchmarks/profile_summary.py /tmp/prof --top 40

Thunk times are wall times on the thread that ran them; ops that run concurrently on the two
cores each count their own wall time, and an op dispatched to a separate thread pool (Eigen's
dots) may show only its launch, so the FLOP rates are indicative, not exact.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
from typing import Any

# Substrings of an op's metadata (the einsum / module path) -> part of the model.
PARTS = (("CD,VD", "vocab_head"), ("NCV,", "vocab_head"), ("NCD,VD", "vocab_head"),
         ("/mlp/", "mlp"), ("attn_vec_einsum", "attn_out_proj"), ("qkv_einsum", "qkv_proj"),
         ("q_einsum", "q_proj"), ("kv_einsum", "kv_proj"), ("/attn/", "attention"))


def _dims(shape: str) -> list[int]:
  m = re.match(r"\w+\[([\d,]*)\]", shape)
  return [int(x) for x in m.group(1).split(",") if x] if m else []


def parse_hlo(text: str) -> dict[str, dict[str, Any]]:
  """Instruction name -> {op, shape, flops (of the dots in it), meta} for an HLO module."""
  bodies = {m.group(1): m.group(2) for m in re.finditer(
      r"^%?([\w.\-]+) \(.*?\) -> .*? \{\n(.*?)\n\}", text, re.S | re.M)}

  def dot_flops(body: str) -> int:
    shapes, total = {}, 0
    for line in body.splitlines():
      m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\w+\[[\d,]*\])", line)
      if not m:
        continue
      shapes[m.group(1)] = _dims(m.group(2))
      ops = re.search(r" dot\(%([\w.\-]+), %([\w.\-]+)\)", line)
      contract = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
      if ops and contract and ops.group(1) in shapes:
        k = 1
        for i in contract.group(1).split(","):
          k *= shapes[ops.group(1)][int(i)] if i else 1
        n = 1
        for x in shapes[m.group(1)]:
          n *= x
        total += 2 * n * k
    return total

  out = {}
  for m in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = (\w+\[[\d,]*\])\S* ([\w\-]+)\((.*)$",
                       text, re.M):
    name, shape, op, rest = m.groups()
    calls = re.search(r"calls=%([\w.\-]+)", rest)
    meta = re.search(r'op_name="([^"]*)"', rest)
    flops = dot_flops(bodies[calls.group(1)]) if op == "fusion" and calls and \
        calls.group(1) in bodies else (dot_flops(m.group(0)) if op == "dot" else 0)
    out[name] = {"op": op, "shape": shape, "flops": flops, "meta": meta.group(1) if meta else ""}
  return out


def op_times(trace: dict) -> tuple[collections.Counter, collections.Counter]:
  """Total microseconds and call counts per event name on XLA's worker threads."""
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  total, count = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") == "X" and "XLA" in threads.get((e["pid"], e["tid"]), ""):
      total[e["name"]] += e.get("dur", 0)
      count[e["name"]] += 1
  return total, count


def part_of(info: dict[str, Any]) -> str:
  for key, part in PARTS:
    if key in info["meta"]:
      return part
  return "dot (no metadata)" if info["flops"] else "other"


def summarise(profile_dir: str, hlo_glob: str = "*jit_train_step*.cpu_after_optimizations.txt"
              ) -> dict[str, Any]:
  """The per-op rows and per-part totals of the newest trace under `profile_dir`."""
  traces = sorted(glob.glob(os.path.join(profile_dir, "**", "perfetto_trace.json.gz"),
                            recursive=True), key=os.path.getmtime)
  hlos = sorted(glob.glob(os.path.join(profile_dir, "**", hlo_glob), recursive=True),
                key=os.path.getsize)
  if not traces or not hlos:
    raise SystemExit(f"{profile_dir}: need a perfetto_trace.json.gz and an optimised HLO dump "
                     f"matching {hlo_glob!r} (train_step.py --profile-dir writes both)")
  with gzip.open(traces[-1]) as f:
    total, count = op_times(json.load(f))
  with open(hlos[-1]) as f:
    hlo = parse_hlo(f.read())
  rows, parts = [], collections.defaultdict(lambda: [0.0, 0.0])
  for name, us in total.items():
    if name not in hlo:
      continue
    info = hlo[name]
    flops = info["flops"] * count[name]
    rows.append({"name": name, "ms": us / 1e3, "calls": count[name], "gflop": flops / 1e9,
                 "gflops_per_s": flops / us / 1e3 if us else 0.0, "shape": info["shape"],
                 "part": part_of(info), "meta": info["meta"]})
    parts[part_of(info)][0] += us / 1e3
    parts[part_of(info)][1] += flops / 1e9
  rows.sort(key=lambda r: -r["ms"])
  return {"trace": traces[-1], "hlo": hlos[-1], "op_ms": sum(r["ms"] for r in rows),
          "parts": {k: {"ms": v[0], "gflop": v[1], "gflops_per_s": v[1] / v[0] * 1e3 if v[0]
                        else 0.0} for k, v in sorted(parts.items(), key=lambda kv: -kv[1][0])},
          "ops": rows}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("profile_dir")
  p.add_argument("--top", type=int, default=30, help="ops to list")
  p.add_argument("--hlo-glob", default="*jit_train_step*.cpu_after_optimizations.txt")
  p.add_argument("--json", action="store_true", help="print one JSON object instead")
  a = p.parse_args(argv)
  s = summarise(a.profile_dir, a.hlo_glob)
  if a.json:
    s["ops"] = s["ops"][:a.top]
    print(json.dumps(s))
    return 0
  print(f"{s['op_ms']:.0f} ms in XLA ops ({s['trace']})")
  for part, v in s["parts"].items():
    print(f"  {part:20s} {v['ms']:8.1f} ms {v['gflop']:8.1f} GFLOP {v['gflops_per_s']:7.1f} GFLOP/s")
  for r in s["ops"][:a.top]:
    print(f"{r['ms']:8.1f} ms {r['calls']:4d}x {r['gflops_per_s']:6.1f} GFLOP/s {r['name']:32s} "
          f"{r['shape']:24s} {r['part']:14s} {r['meta'][-60:]}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
