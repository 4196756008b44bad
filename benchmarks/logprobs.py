"""Peak memory and time of chunked vs naive per-token log-probs over a huge vocabulary.

Prints JSON, one object per line; the last line is a summary. Each measured
configuration runs in its own subprocess, so its peak RSS is its own.

  python benchmarks/logprobs.py                       # B=8, T=1024, D=2048, V=256000, f32
  python benchmarks/logprobs.py --batch 2 --seq 256 --vocab 32000 --repeats 2

What is measured, per mode ("fwd": log-probs only; "value_and_grad": grad of
their mean w.r.t. hidden [B, T, D] and unembedding [V, D], the training case):

  * naive: `hidden @ unembedding.T` -> float32 [B, T, V] logits ->
    `jax.nn.log_softmax` -> gather. At the full batch it is only compiled, never
    run (it needs ~21 GB): its memory is `memory_analysis()` of the compiled
    executable (temp + argument + output bytes). It is timed at `time_batch`,
    the largest batch whose compiled footprint fits `--mem-budget-gb`.
  * chunked: `prefjax.ops.token_logps_from_hidden` (custom VJP, chunks of
    `--chunk` positions, vocabulary blocks of `--vocab-chunk`). Run for real at
    the full batch (memory_analysis + peak RSS + time) and at `time_batch`
    (for the same-batch time comparison with naive).
  * `--tune-chunks`: compiled memory of other chunk sizes (time too with
    `--tune-time`, at `time_batch`).

Time is the median of `--repeats` runs after `--warmup` runs of the
ahead-of-time compiled executable; the full-batch chunked runs use
`--full-repeats` runs and no warm-up (one run takes minutes on a CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

GB = 1e9


def _build(cfg):
  """Returns (fn, abstract args) for one configuration."""
  import jax
  import jax.numpy as jnp
  from prefjax import ops

  b, t, d, v = cfg["batch"], cfg["seq"], cfg["dim"], cfg["vocab"]
  cap = cfg.get("softcap")

  def naive(h, w, y):
    z = jnp.einsum("BTD,VD->BTV", h, w, preferred_element_type=jnp.float32)
    if cap is not None:
      z = cap * jnp.tanh(z / cap)
    return jnp.take_along_axis(jax.nn.log_softmax(z, axis=-1), y[..., None], axis=-1)[..., 0]

  def chunked(h, w, y):
    kw = {}
    if cfg["impl"] == "chunked":
      kw["vocab_chunk_size"] = cfg["vocab_chunk"]
    return ops.token_logps_from_hidden(
        h, w, y, chunk_size=cfg["chunk"], logit_softcap=cap,
        implementation="checkpoint" if cfg["impl"] == "checkpoint" else "custom_vjp", **kw)

  f = naive if cfg["impl"] == "naive" else chunked
  if cfg["mode"] == "value_and_grad":
    fn = jax.value_and_grad(lambda h, w, y: jnp.mean(f(h, w, y)), argnums=(0, 1))
  else:
    fn = f
  dt = jnp.dtype(cfg["dtype"])
  args = (jax.ShapeDtypeStruct((b, t, d), dt), jax.ShapeDtypeStruct((v, d), dt),
          jax.ShapeDtypeStruct((b, t), jnp.int32))
  return fn, args


def _inputs(cfg):
  """Random inputs made on the device (no host copies inflating RSS)."""
  import jax
  import jax.numpy as jnp

  b, t, d, v = cfg["batch"], cfg["seq"], cfg["dim"], cfg["vocab"]
  dt = jnp.dtype(cfg["dtype"])

  @jax.jit
  def make(key):
    k1, k2, k3 = jax.random.split(key, 3)
    h = jax.random.normal(k1, (b, t, d), dt)
    w = (jax.random.normal(k2, (v, d), jnp.float32) * d ** -0.5).astype(dt)
    y = jax.random.randint(k3, (b, t), 0, v, jnp.int32)
    return h, w, y

  return make(jax.random.key(0))


def _rss_bytes():
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) * 1024
  return None


def worker(cfg):
  """Compiles (and optionally runs) one configuration; returns its JSON record."""
  import jax

  fn, abstract = _build(cfg)
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*abstract).compile()
  rec = dict(cfg, compile_s=round(time.perf_counter() - t0, 2))
  ma = compiled.memory_analysis()
  mem = {k: int(getattr(ma, f"{k}_size_in_bytes")) for k in ("temp", "argument", "output", "alias")}
  mem["total"] = mem["temp"] + mem["argument"] + mem["output"] - mem["alias"]
  rec["memory_analysis_bytes"] = mem
  rec["executed"] = bool(cfg["execute"])
  if cfg["execute"]:
    args = _inputs(cfg)
    jax.block_until_ready(args)
    rec["rss_after_inputs_bytes"] = _rss_bytes()
    times = []
    for i in range(cfg["warmup"] + cfg["repeats"]):
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      if i >= cfg["warmup"]:
        times.append(time.perf_counter() - t0)
    rec["times_s"] = [round(x, 3) for x in times]
    rec["time_s_median"] = round(statistics.median(times), 3)
    rec["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  return rec


def _run_sub(cfg):
  env = dict(os.environ)
  env.setdefault("JAX_PLATFORMS", "cpu")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
  out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cfg)],
                       env=env, capture_output=True, text=True, check=False)
  if out.returncode != 0:
    return dict(cfg, error=out.stderr.strip().splitlines()[-1:] or [f"rc {out.returncode}"])
  rec = json.loads(out.stdout.strip().splitlines()[-1])
  print(json.dumps(rec), flush=True)
  return rec


def _ratio(a, b):
  return None if not a or not b else round(a / b, 2)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=1024)
  p.add_argument("--dim", type=int, default=2048)
  p.add_argument("--vocab", type=int, default=256000)
  p.add_argument("--chunk", type=int, default=128)
  p.add_argument("--vocab-chunk", type=int, default=8192)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--softcap", type=float, default=None)
  p.add_argument("--mem-budget-gb", type=float, default=8.0,
                 help="largest compiled footprint (GB) of a naive run that is executed")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--full-repeats", type=int, default=1)
  p.add_argument("--no-full-run", action="store_true", help="don't execute chunked at --batch")
  p.add_argument("--tune-chunks", default="", help="comma list, e.g. 64,256,512")
  p.add_argument("--tune-time", action="store_true")
  p.add_argument("--modes", default="fwd,value_and_grad")
  p.add_argument("--worker", help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  if a.worker:
    print(json.dumps(worker(json.loads(a.worker))), flush=True)
    return

  base = dict(seq=a.seq, dim=a.dim, vocab=a.vocab, dtype=a.dtype, softcap=a.softcap,
              chunk=a.chunk, vocab_chunk=a.vocab_chunk, warmup=a.warmup, repeats=a.repeats)
  t_start = time.time()
  summary = {"summary": True, "batch": a.batch, "seq": a.seq, "dim": a.dim, "vocab": a.vocab,
             "dtype": a.dtype, "chunk": a.chunk, "vocab_chunk": a.vocab_chunk, "modes": {}}
  for mode in a.modes.split(","):
    naive_full = _run_sub(dict(base, impl="naive", mode=mode, batch=a.batch, execute=False))
    per_row = naive_full["memory_analysis_bytes"]["total"] / a.batch
    tb = max(1, min(a.batch, int(a.mem_budget_gb * GB // per_row)))
    chunk_full = _run_sub(dict(base, impl="chunked", mode=mode, batch=a.batch,
                               execute=not a.no_full_run, warmup=0, repeats=a.full_repeats))
    naive_tb = _run_sub(dict(base, impl="naive", mode=mode, batch=tb, execute=True))
    chunk_tb = _run_sub(dict(base, impl="chunked", mode=mode, batch=tb, execute=True))
    tune = {}
    for c in [int(x) for x in a.tune_chunks.split(",") if x]:
      r = _run_sub(dict(base, impl="chunked", mode=mode, chunk=c,
                        batch=tb if a.tune_time else a.batch, execute=a.tune_time))
      tune[c] = {"temp_bytes_at_batch": r.get("memory_analysis_bytes", {}).get("temp"),
                 "batch": r["batch"], "time_s_median": r.get("time_s_median")}
    nm, cm = naive_full["memory_analysis_bytes"], chunk_full["memory_analysis_bytes"]
    summary["modes"][mode] = {
        "naive_total_bytes_at_batch": nm["total"],
        "chunked_total_bytes_at_batch": cm["total"],
        "total_memory_ratio_naive_over_chunked": _ratio(nm["total"], cm["total"]),
        "naive_temp_bytes_at_batch": nm["temp"],
        "chunked_temp_bytes_at_batch": cm["temp"],
        "temp_memory_ratio_naive_over_chunked": _ratio(nm["temp"], cm["temp"]),
        "naive_source": "memory_analysis of the compiled executable, not executed",
        "chunked_peak_rss_bytes_at_batch": chunk_full.get("peak_rss_bytes"),
        "chunked_time_s_at_batch": chunk_full.get("time_s_median"),
        "time_batch": tb,
        "naive_time_s_at_time_batch": naive_tb.get("time_s_median"),
        "chunked_time_s_at_time_batch": chunk_tb.get("time_s_median"),
        "time_ratio_chunked_over_naive": _ratio(chunk_tb.get("time_s_median"),
                                                naive_tb.get("time_s_median")),
        "naive_peak_rss_bytes_at_time_batch": naive_tb.get("peak_rss_bytes"),
        "chunked_peak_rss_bytes_at_time_batch": chunk_tb.get("peak_rss_bytes"),
        "tune_chunks": tune,
    }
  summary["wall_s"] = round(time.time() - t_start, 1)
  print(json.dumps(summary), flush=True)


if __name__ == "__main__":
  main()
