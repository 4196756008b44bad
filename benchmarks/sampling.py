"""Decode throughput of the KV-cache sampler (prefjax.models.sample) on a random model.

Prints one JSON object: compile time, prefill + decode wall time and generated tokens/s.
Random weights: the stop token is disabled so every row generates `--new-tokens` tokens.

  python benchmarks/sampling.py                          # bench_46m, batch 8, prompt 64, 64 new
  python benchmarks/sampling.py --preset tiny_gemma2 --new-tokens 16
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np

from prefjax import models


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="bench_46m")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--prompt-len", type=int, default=64)
  parser.add_argument("--new-tokens", type=int, default=64)
  parser.add_argument("--temperature", type=float, default=0.0)
  parser.add_argument("--top-k", type=int, default=0)
  parser.add_argument("--top-p", type=float, default=1.0)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()

  cfg = models.get_config(args.preset, dtype=args.dtype)
  params = models.init_params(cfg, 0)
  rng = np.random.default_rng(0)
  prompts = rng.integers(3, cfg.vocab_size, size=(args.batch, args.prompt_len)).astype(np.int32)
  # Prompts of different lengths (right-padded), from half to the full length.
  lengths = np.linspace(args.prompt_len // 2, args.prompt_len, args.batch).astype(np.int32)
  kw = dict(max_new_tokens=args.new_tokens, temperature=args.temperature, top_k=args.top_k,
            top_p=args.top_p, stop_tokens=())

  def run(seed):
    out = models.sample(cfg, params, prompts, lengths, jax.random.key(seed), **kw)
    return jax.block_until_ready(out)

  start = time.perf_counter()
  out = run(0)
  first = time.perf_counter() - start
  times, cpu = [], []
  for i in range(args.repeats):
    start, cpu_start = time.perf_counter(), time.process_time()
    run(i + 1)
    times.append(time.perf_counter() - start)
    cpu.append(time.process_time() - cpu_start)
  wall = statistics.median(times)
  generated = int(np.asarray(out.lengths).sum())
  print(json.dumps({
      "benchmark": "sampling", "preset": args.preset, "params": models.count_params(params),
      "backend": jax.default_backend(), "devices": jax.device_count(), "dtype": args.dtype,
      "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
      "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
      "compile_plus_first_run_s": round(first, 3), "median_run_s": round(wall, 4),
      # CPU seconds of this process (the machine may be shared: wall time includes waiting).
      "median_run_cpu_s": round(statistics.median(cpu), 4),
      "generated_tokens": generated, "tokens_per_s": round(generated / wall, 1),
      "ms_per_decode_step": round(1000 * wall / args.new_tokens, 2),
  }))


if __name__ == "__main__":
  main()
