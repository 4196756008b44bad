r"""Peak RSS and step time of compare_trl's prefjax worker under XLA:CPU scheduling settings.

Each variant (instruction scheduler x `scan_layers` x `remat`) runs in a fresh process (a
clean `VmHWM`) on the same HF checkpoints and batches as `compare_trl.py` (46M Gemma-1, 8
pairs, prompt 64, responses 64..192, float32), 1 warm-up + `--steps` timed steps, and prints
one JSON line: median step seconds, peak RSS, RSS after set-up and after the last step. The
settings change how XLA orders and stores the same computation, not the computation; the
losses of every variant are printed so that can be checked.

  python benchmarks/step_memory.py                      # the 8 variants of docs/performance.md
  python benchmarks/step_memory.py --config dpo_precomputed --variants memory_optimized:1:none
  python benchmarks/step_memory.py --tiny               # seconds: the --tiny model
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(0, os.path.dirname(_HERE))

import compare_trl  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

DEFAULT_VARIANTS = ("concurrency_optimized:0:none", "concurrency_optimized:1:none",
                    "concurrency_optimized:1:full", "concurrency_optimized:1:save_dots",
                    "memory_optimized:0:none", "memory_optimized:0:full",
                    "memory_optimized:1:none", "memory_optimized:1:full")


def _rss_gib() -> dict[str, float]:
  out = {}
  with open("/proc/self/status") as f:
    for line in f:
      key = line.split(":")[0]
      if key in ("VmRSS", "VmHWM"):
        out[key] = int(line.split()[1]) / 2 ** 20
  return out


def _worker(workdir: str, config: str, variant: str) -> dict:
  scheduler, scan, remat = variant.split(":")
  with open(os.path.join(workdir, "spec.json")) as f:
    spec = compare_trl.Spec(**json.load(f))
  spec = dataclasses.replace(spec, prefjax_scan_layers=scan == "1", prefjax_remat=remat,
                             prefjax_cpu_scheduler=scheduler)
  t0 = time.perf_counter()
  worker = compare_trl._PrefjaxWorker(spec, config)  # pylint: disable=protected-access
  setup = {"setup_s": time.perf_counter() - t0, "rss_after_setup_gib": _rss_gib()["VmRSS"]}
  times, losses = [], []
  for batch in worker.batches:
    t = time.perf_counter()
    losses.append(float(worker.step(batch)))
    times.append(time.perf_counter() - t)
  measured = times[spec.warmup:] or times
  return {"config": config, "cpu_scheduler": scheduler, "scan_layers": scan == "1",
          "remat": remat, "median_step_s": statistics.median(measured), "step_times_s": times,
          "losses": losses, "kernels": worker.kernels.to_dict(),
          "peak_rss_gib": _rss_gib()["VmHWM"],
          "rss_after_last_step_gib": _rss_gib()["VmRSS"], **setup,
          "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="dpo_ref", help="a prefjax config of compare_trl.py")
  p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS),
                 help="SCHEDULER:SCAN:REMAT, e.g. memory_optimized:1:none")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--workdir", default=None, help="reuse compare_trl checkpoints (spec.json) here")
  p.add_argument("--tiny", action="store_true")
  p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args._worker:
    print(json.dumps(_worker(args.workdir, args.config, args._worker)), flush=True)
    return 0
  own = None
  if args.workdir is None:
    own = tempfile.TemporaryDirectory(prefix="step_memory_")
    args.workdir = own.name
  if not os.path.exists(os.path.join(args.workdir, "spec.json")):
    spec = compare_trl.Spec(steps=args.steps, warmup=args.warmup, workdir=args.workdir)
    if args.tiny:
      spec = compare_trl.tiny_spec(spec)
    with open(os.path.join(args.workdir, "examples.json"), "w") as f:
      json.dump(compare_trl.make_examples(spec), f)
    with open(os.path.join(args.workdir, "spec.json"), "w") as f:
      json.dump(dataclasses.asdict(spec), f)
    compare_trl.build_checkpoints(spec)
  env = dict(os.environ)
  from prefjax import host_env  # pylint: disable=g-import-not-at-top
  host_env.apply_to(env)  # as `python -m prefjax.main` runs
  for variant in args.variants:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--config", args.config,
                          "--workdir", args.workdir, "--_worker", variant],
                         env=env, capture_output=True, text=True)
    if out.returncode:
      print(json.dumps({"variant": variant, "error": out.stderr[-2000:]}), flush=True)
    else:
      print(out.stdout.strip().splitlines()[-1], flush=True)
  if own is not None:
    own.cleanup()
  return 0


if __name__ == "__main__":
  sys.exit(main())
