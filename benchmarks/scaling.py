r"""Scaling sweeps of the train step: sequence length, batch, 1 vs 8 devices, compile time.

Each point is a fresh `benchmarks/train_step.py` process (clean peak RSS, its own device
count), so the sweeps compose the same jitted step the trainer uses. Prints one JSON object
per point, then a summary object as the last line.

  python benchmarks/scaling.py                  # all sweeps; peak.py measures the MFU denominator
  python benchmarks/scaling.py --sweeps seq --seq 256,1024,4096
  python benchmarks/scaling.py --sweeps compile --layers 2,4,8,16

Sweeps:
  seq      step time / real tokens/s / MFU vs sequence length L (one pair per step, prompt 64,
           responses L-64 tokens; reference-free SimPO so only the policy runs).
  batch    the same vs pairs per step at L = 256.
  devices  DPO with a live reference at the bench shape on 1 vs 8 (fake, host-platform) devices:
           the sharding overhead on one physical CPU (XLA splits the work 8 ways, same cores).
  compile  XLA compile time of the DPO step vs number of layers, unrolled vs `scan_layers`.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import peak  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position  (benchmarks/peak.py)


def _point(args: list[str], devices: int = 1, timeout: int = 1800) -> dict:
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  if devices > 1:
    flags.append(f"--xla_force_host_platform_device_count={devices}")
  env["XLA_FLAGS"] = " ".join(flags)
  env.setdefault("JAX_PLATFORMS", "cpu")
  t0 = time.perf_counter()
  r = subprocess.run([sys.executable, str(HERE / "train_step.py"), *args], env=env,
                     capture_output=True, text=True, timeout=timeout)
  lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
  if r.returncode or not lines:
    return {"error": r.stderr[-1500:], "args": args}
  out = json.loads(lines[-1])
  out["process_wall_s"] = round(time.perf_counter() - t0, 1)
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--sweeps", default="seq,batch,devices,compile")
  p.add_argument("--preset", default="bench_46m")
  p.add_argument("--seq", default="256,512,1024,2048,4096")
  p.add_argument("--batch", default="1,2,4,8")
  p.add_argument("--layers", default="2,4,8,16")
  p.add_argument("--steps", type=int, default=2)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--peak-flops", type=float, default=None,
                 help="float32 peak for MFU (default: benchmarks/peak.py, run before the sweeps "
                      "for MFU and after them for `mfu_vs_max_peak`)")
  p.add_argument("--scan-layers", action="store_true",
                 help="seq / batch / devices sweeps with ModelConfig.scan_layers")
  p.add_argument("--remat", default="none", help="ModelConfig.remat of those sweeps")
  p.add_argument("--cpu-scheduler", default="memory_optimized",
                 help="kernels.cpu_scheduler of every point")
  p.add_argument("--attention-causal-block", type=int, default=None,
                 help="kernels.attention_causal_block of every point (default: the platform's)")
  p.add_argument("--attention-query-block", type=int, default=None,
                 help="kernels.attention_query_block of every point (default: the platform's)")
  p.add_argument("--attention-key-tile", type=int, default=None,
                 help="kernels.attention_key_tile of every point (default: 0, off)")
  p.add_argument("--logps-implementation", default=None,
                 help="kernels.logps_implementation of every point (saved_logits: no "
                      "LM-head recomputation in the backward pass)")
  p.add_argument("--peak-between-steps", action="store_true",
                 help="train_step.py --peak-between-steps at every point (adds `mfu_adjacent`)")
  a = p.parse_args(argv)
  peak_runs = []
  if a.peak_flops is None:
    peak_runs.append(peak.measure_in_subprocess(a.preset.startswith("tiny")))
    a.peak_flops = peak_runs[0]
  common = ["--preset", a.preset, "--steps", str(a.steps), "--warmup", str(a.warmup),
            "--peak-flops", str(a.peak_flops), "--remat", a.remat,
            "--cpu-scheduler", a.cpu_scheduler] + (["--scan-layers"] if a.scan_layers else [])
  extra = []
  if a.attention_causal_block is not None:
    extra += ["--attention-causal-block", str(a.attention_causal_block)]
  if a.attention_query_block is not None:
    extra += ["--attention-query-block", str(a.attention_query_block)]
  if a.attention_key_tile is not None:
    extra += ["--attention-key-tile", str(a.attention_key_tile)]
  if a.logps_implementation:
    extra += ["--logps-implementation", a.logps_implementation]
  if a.peak_between_steps:
    extra.append("--peak-between-steps")
  common += extra
  summary: dict = {"summary": True, "preset": a.preset, "peak_flops": a.peak_flops}
  sweeps = a.sweeps.split(",")
  if "seq" in sweeps:
    rows = []
    for length in [int(x) for x in a.seq.split(",")]:
      r = _point(common + ["--tasks", "simpo", "--layouts", "padded", "--batch", "1",
                           "--prompt-len", "64", "--min-response", str(length - 64),
                           "--max-response", str(length - 64)])
      r.update(sweep="seq", seq_len=length)
      print(json.dumps(r), flush=True)
      rows.append(r)
    summary["seq"] = {r["seq_len"]: {k: r.get(k) for k in (
        "step_s", "step_s_min", "real_tokens_per_s", "mfu", "mfu_dense", "mfu_adjacent",
        "peak_rss_gib")}
                      for r in rows}
  if "batch" in sweeps:
    rows = []
    for b in [int(x) for x in a.batch.split(",")]:
      r = _point(common + ["--tasks", "simpo", "--layouts", "padded", "--batch", str(b),
                           "--prompt-len", "64", "--min-response", "192",
                           "--max-response", "192"])
      r.update(sweep="batch", batch_pairs=b)
      print(json.dumps(r), flush=True)
      rows.append(r)
    summary["batch"] = {r["batch_pairs"]: {k: r.get(k) for k in ("step_s", "real_tokens_per_s",
                                                                "mfu")} for r in rows}
  if "devices" in sweeps:
    rows = []
    for d in (1, 8):
      r = _point(common + ["--tasks", "dpo", "--layouts", "padded"], devices=d)
      r.update(sweep="devices")
      print(json.dumps(r), flush=True)
      rows.append(r)
    if all("step_s" in r for r in rows):
      summary["devices"] = {"step_s_1": rows[0]["step_s"], "step_s_8": rows[1]["step_s"],
                            "overhead_8_over_1": round(rows[1]["step_s"] / rows[0]["step_s"], 3)}
  if "compile" in sweeps:
    rows = []
    for n in [int(x) for x in a.layers.split(",")]:
      for scan in (False, True):
        r = _point(["--preset", a.preset, "--tasks", "dpo", "--layouts", "padded",
                    "--layers", str(n), "--compile-only", "--cpu-scheduler", a.cpu_scheduler]
                   + (["--scan-layers"] if scan else []))
        r.update(sweep="compile")
        print(json.dumps(r), flush=True)
        rows.append(r)
    summary["compile_s"] = {f"{r.get('layers')}{'_scan' if r.get('scan_layers') else ''}":
                            r.get("compile_s") for r in rows}
  if peak_runs:  # contention only lowers a measured peak: report both, MFU used the first
    peak_runs.append(peak.measure_in_subprocess(a.preset.startswith("tiny")))
    summary["peak_flops_runs"] = peak_runs
    summary["peak_flops_max_over_first"] = round(max(peak_runs) / peak_runs[0], 4)
    # The conservative figure: MFU against the higher of the two peaks.
    for row in summary.get("seq", {}).values():
      if row.get("mfu") is not None:
        row["mfu_vs_max_peak"] = round(row["mfu"] * peak_runs[0] / max(peak_runs), 4)
  print(json.dumps(summary), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
