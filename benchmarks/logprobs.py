"""Peak memory and time of chunked vs naive per-token log-probs over a huge vocabulary.

Prints JSON, one object per line; the last line is a summary. Each measured
configuration runs in its own subprocess, so its peak RSS is its own.

  python benchmarks/logprobs.py                       # B=8, T=1024, D=2048, V=256000, f32
  python benchmarks/logprobs.py --repeats 1 --warmup 0 --time-batch 1   # quicker, shared CPU
  python benchmarks/logprobs.py --batch 2 --seq 256 --vocab 32000 --repeats 2

What is measured, per mode ("fwd": log-probs only; "value_and_grad": grad of
their mean w.r.t. hidden [B, T, D] and unembedding [V, D], the training case):

  * naive: `hidden @ unembedding.T` -> float32 [B, T, V] logits ->
    `jax.nn.log_softmax` -> gather. At the full batch it is only compiled, never
    run (it needs ~21 GB): its memory is `memory_analysis()` of the compiled
    executable (temp + argument + output bytes). It is timed at `time_batch`
    (`--time-batch`, or the largest batch whose compiled footprint fits
    `--mem-budget-gb`; mind that RSS also holds the inputs).
  * chunked: `prefjax.ops.token_logps_from_hidden` (custom VJP, chunks of
    `--chunk` positions, vocabulary blocks of `--vocab-chunk`). Compiled at the
    full batch (memory_analysis), executed there only with `--full-run`
    (value_and_grad at B=8 is ~34 TFLOP: tens of minutes on 2 shared CPU
    cores), and executed at `time_batch` for the same-batch time comparison
    with naive, with `--time-chunk` positions per chunk (default: as many
    tokens per chunk as at the full batch, so the same scratch memory).
  * `--tune-chunks`: compiled memory of other chunk sizes (time too with
    `--tune-time`, at `time_batch`).

Time is the median of `--repeats` runs after `--warmup` runs of the
ahead-of-time compiled executable (wall and process CPU seconds; CPU seconds
are the steadier number when other jobs share the cores); the full-batch
chunked runs use `--full-repeats` runs and no warm-up.
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
    del k2  # a cheap deterministic [V, D] (fused, no RNG temporaries of W's size)
    idx = jax.lax.broadcasted_iota(jnp.float32, (v, d), 0) * 0.7548 + \
        jax.lax.broadcasted_iota(jnp.float32, (v, d), 1) * 0.5698
    w = (jnp.sin(idx) * (2.0 / d) ** 0.5).astype(dt)
    y = jax.random.randint(k3, (b, t), 0, v, jnp.int32)
    return h, w, y

  return make(jax.random.key(0))


def _status_bytes(field):
  """VmRSS / VmHWM (peak RSS) of this process from /proc/self/status, in bytes."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  return None


def _reset_peak_rss():
  """Resets VmHWM to the current RSS (Linux >= 4.0), so input creation is not counted."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


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
    rec["rss_after_inputs_bytes"] = _status_bytes("VmRSS")
    rec["peak_rss_reset_after_inputs"] = _reset_peak_rss()
    times, cpu = [], []
    for i in range(cfg["warmup"] + cfg["repeats"]):
      t0, c0 = time.perf_counter(), time.process_time()
      jax.block_until_ready(compiled(*args))
      if i >= cfg["warmup"]:
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    rec["times_s"] = [round(x, 3) for x in times]
    rec["time_s_median"] = round(statistics.median(times), 3)
    # CPU seconds of all threads of this process: less sensitive than wall time
    # to other jobs sharing the cores.
    rec["cpu_s_median"] = round(statistics.median(cpu), 3)
    # Peak RSS while running (VmHWM, reset after the inputs were made; falls back
    # to the whole-process peak if the reset is unavailable).
    rec["peak_rss_bytes"] = (_status_bytes("VmHWM") if rec["peak_rss_reset_after_inputs"]
                             else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    rec["peak_rss_over_inputs_bytes"] = rec["peak_rss_bytes"] - rec["rss_after_inputs_bytes"]
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
  p.add_argument("--time-batch", type=int, default=None,
                 help="batch for the naive-vs-chunked timing (default: from --mem-budget-gb)")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--full-repeats", type=int, default=1)
  p.add_argument("--full-run", action="store_true",
                 help="also execute chunked at --batch (minutes of CPU at the default sizes)")
  p.add_argument("--time-chunk", type=int, default=None,
                 help="chunk used at time_batch; default keeps tokens per chunk "
                      "(chunk * batch / time_batch, at most seq) so scratch memory matches")
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
    tb = a.time_batch or max(1, min(a.batch, int(a.mem_budget_gb * GB // per_row)))
    chunk_full = _run_sub(dict(base, impl="chunked", mode=mode, batch=a.batch,
                               execute=a.full_run, warmup=0, repeats=a.full_repeats))
    tc = a.time_chunk or min(a.seq, a.chunk * a.batch // tb)
    naive_tb = _run_sub(dict(base, impl="naive", mode=mode, batch=tb, execute=True))
    chunk_tb = _run_sub(dict(base, impl="chunked", mode=mode, batch=tb, chunk=tc, execute=True))
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
        "time_chunk": tc,
        "chunked_temp_bytes_at_time_batch": chunk_tb.get("memory_analysis_bytes", {}).get("temp"),
        "naive_time_s_at_time_batch": naive_tb.get("time_s_median"),
        "chunked_time_s_at_time_batch": chunk_tb.get("time_s_median"),
        "time_ratio_chunked_over_naive": _ratio(chunk_tb.get("time_s_median"),
                                                naive_tb.get("time_s_median")),
        "naive_cpu_s_at_time_batch": naive_tb.get("cpu_s_median"),
        "chunked_cpu_s_at_time_batch": chunk_tb.get("cpu_s_median"),
        "cpu_time_ratio_chunked_over_naive": _ratio(chunk_tb.get("cpu_s_median"),
                                                    naive_tb.get("cpu_s_median")),
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "naive_peak_rss_bytes_at_time_batch": naive_tb.get("peak_rss_bytes"),
        "chunked_peak_rss_bytes_at_time_batch": chunk_tb.get("peak_rss_bytes"),
        "tune_chunks": tune,
    }
    m = summary["modes"][mode]
    m["target_8x_memory_total_met"] = (m["total_memory_ratio_naive_over_chunked"] or 0) >= 8
    m["target_8x_memory_temp_met"] = (m["temp_memory_ratio_naive_over_chunked"] or 0) >= 8
    m["target_1.3x_wall_time_met"] = (m["time_ratio_chunked_over_naive"] or 99) <= 1.3
    m["target_1.3x_cpu_time_met"] = (m["cpu_time_ratio_chunked_over_naive"] or 99) <= 1.3
  summary["wall_s"] = round(time.time() - t_start, 1)
  print(json.dumps(summary), flush=True)


if __name__ == "__main__":
  main()
