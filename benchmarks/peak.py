"""Peak jitted matmul FLOP/s of this machine: the denominator of every MFU figure.

Times `jax.jit(jnp.dot)` on square [n, n] @ [n, n] operands for a few sizes in
float32 and bfloat16 (bfloat16 operands accumulate in float32), keeps the best
of `--repeats` timed calls per size (best-of is the right statistic for a peak
on a shared, noisy machine), and prints one JSON object:

  {"backend": ..., "devices": ..., "float32": {"peak_flops": F, "by_size": {...}},
   "bfloat16": {...}, "peak_flops_float32": F, "peak_flops_bfloat16": F}

Usage:
  python benchmarks/peak.py                     # sizes 512 1024 2048, 7 repeats
  python benchmarks/peak.py --sizes 2048 4096 --repeats 5 --dtypes float32
  python benchmarks/peak.py --tiny              # seconds; for tests
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any, Sequence


def measure_matmul(n: int, dtype_name: str, repeats: int, min_time: float = 0.05) -> float:
  """Best-of-`repeats` FLOP/s of one jitted [n,n] @ [n,n] matmul.

  Each timed sample runs the matmul enough times back to back to last at least
  `min_time` seconds, so small sizes are not dominated by dispatch overhead.

  Args:
    n: matrix side.
    dtype_name: "float32" or "bfloat16".
    repeats: number of timed samples; the best is returned.
    min_time: seconds each sample should last at least.

  Returns:
    Peak FLOP/s (2·n³ per matmul) over the samples.
  """
  import jax
  import jax.numpy as jnp

  dtype = jnp.dtype(dtype_name)
  ka, kb = jax.random.split(jax.random.key(n))
  a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
  # Accumulate in float32 for every input dtype (what the model's einsums do).
  f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
  f(a, b).block_until_ready()  # compile + warm
  t0 = time.perf_counter()
  f(a, b).block_until_ready()
  one = max(time.perf_counter() - t0, 1e-6)
  inner = max(1, int(min_time / one))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(inner):
      out = f(a, b)
    out.block_until_ready()
    best = min(best, (time.perf_counter() - t0) / inner)
  return 2.0 * n ** 3 / best


def measure(sizes: Sequence[int], dtypes: Sequence[str], repeats: int) -> dict[str, Any]:
  """Peak FLOP/s for each dtype over `sizes`; returns the JSON-ready dict."""
  import jax

  result: dict[str, Any] = {
      "backend": jax.default_backend(),
      "devices": [str(d) for d in jax.devices()],
      "device_count": jax.device_count(),
      "cpu_count": os.cpu_count(),
      "machine": platform.machine(),
      "jax_version": jax.__version__,
      "repeats": repeats,
      "sizes": list(sizes),
  }
  for name in dtypes:
    by_size = {str(n): measure_matmul(n, name, repeats) for n in sizes}
    result[name] = {"peak_flops": max(by_size.values()), "by_size": by_size}
    result[f"peak_flops_{name}"] = result[name]["peak_flops"]
  return result


def measure_in_subprocess(tiny: bool = False) -> float:
  """float32 peak from this script run in a fresh process (keeps JAX out of the caller)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  args = ["--tiny"] if tiny else ["--sizes", "1024", "2048", "--repeats", "5"]
  out = subprocess.run([sys.executable, os.path.abspath(__file__), "--dtypes", "float32", *args],
                       check=True, capture_output=True, text=True, timeout=900)
  return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_flops_float32"])


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point: prints one JSON object on the last line."""
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
  p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                 choices=["float32", "bfloat16"])
  p.add_argument("--repeats", type=int, default=7, help="timed samples per size (best kept)")
  p.add_argument("--tiny", action="store_true", help="sizes 128 256, 2 repeats (smoke test)")
  p.add_argument("--out", default=None, help="also write the JSON to this file")
  args = p.parse_args(argv)
  if args.tiny:
    args.sizes, args.repeats = [128, 256], 2
  result = measure(args.sizes, args.dtypes, args.repeats)
  line = json.dumps(result, sort_keys=True)
  if args.out:
    with open(args.out, "w") as f:
      f.write(line + "\n")
  print(line)
  sys.stdout.flush()
  return 0


if __name__ == "__main__":
  sys.exit(main())
