"""Process settings for CPU hosts that only take effect when a process starts.

XLA:CPU allocates the buffers of every execution of a compiled step with `malloc`. glibc
serves allocations above its mmap threshold (at most 32 MiB) with fresh anonymous mappings
and unmaps them on `free`, so each training step touches gigabytes of brand-new 4 KiB pages:
a `bench_46m` trunk forward+backward (16 x 256 tokens) takes ~4.5 million minor page faults,
each one a kernel entry that zeroes a page. glibc's tunable `glibc.malloc.hugetlb=1` (glibc
>= 2.35) makes malloc `madvise(MADV_HUGEPAGE)` those mappings, so the kernel backs them with
2 MiB transparent huge pages: ~20x fewer faults and 15-25% less step time on a 2-vCPU
Zen 5 VM (`benchmarks/compare_trl.py`), same peak RSS.

glibc reads tunables once, at process start, so the `prefjax` command line re-executes itself
with the tunable added to `GLIBC_TUNABLES` before it imports JAX (`reexec_with_tuned_malloc`).
Set `PREFJAX_HOST_MALLOC=0` to opt out. Nothing happens on non-Linux hosts, on non-glibc or
old glibc, when transparent huge pages are disabled, when the tunable is already set, or on an
accelerator host (`accelerator_host`: the step runs on the TPU / GPU there, and the host's
allocations are not the hot path): `JAX_PLATFORMS` naming anything but cpu, or, when it is
unset, `TPU_ACCELERATOR_TYPE` / `TPU_WORKER_HOSTNAMES` in the environment or TPU / NVIDIA
device files (/dev/accel*, /dev/vfio/<n>, /dev/nvidia<n>). `JAX_PLATFORMS=cpu` is a CPU run
wherever it is.
"""
from __future__ import annotations

import glob
import os
import platform
import sys
from typing import Mapping, MutableMapping, Optional

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT_VAR = "PREFJAX_HOST_MALLOC"
_REEXEC_MARK = "PREFJAX_HOST_MALLOC_APPLIED"
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"
# Set on Cloud TPU VMs (and by launch/ for pods).
TPU_ENV_VARS = ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES")
# Device files of TPU chips (v2-v5e: /dev/accel<n>; v5p / v6e: /dev/vfio/<n>) and NVIDIA GPUs.
ACCELERATOR_DEVICE_GLOBS = ("/dev/accel[0-9]*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*")


def accelerator_host(env: Mapping[str, str],
                     device_globs: Optional[tuple[str, ...]] = None) -> Optional[str]:
  """Why this process will not compute on the host CPU (None: it will), without importing JAX.

  `JAX_PLATFORMS` decides when set (any platform but cpu: an accelerator run); otherwise the
  TPU VM variables (`TPU_ENV_VARS`) or accelerator device files do.
  """
  platforms = [p.strip().lower() for p in env.get("JAX_PLATFORMS", "").split(",") if p.strip()]
  if platforms:
    other = [p for p in platforms if p != "cpu"]
    return f"JAX_PLATFORMS={env['JAX_PLATFORMS']}" if other else None
  for var in TPU_ENV_VARS:
    if env.get(var):
      return f"{var} is set"
  for pattern in ACCELERATOR_DEVICE_GLOBS if device_globs is None else device_globs:
    found = glob.glob(pattern)
    if found:
      return f"{found[0]} exists"
  return None


def pin_cpu_platform(env: MutableMapping[str, str]) -> bool:
  """On a host with no accelerator and no `JAX_PLATFORMS`, sets `JAX_PLATFORMS=cpu`.

  With `jax[tpu]` installed (libtpu, e.g. for ahead-of-time TPU compiles), JAX otherwise
  probes for TPU chips at start-up and libtpu logs errors about missing TPU worker hostnames
  on every CPU run. Returns whether it set the variable.
  """
  if env.get("JAX_PLATFORMS") or accelerator_host(env) is not None:
    return False
  env["JAX_PLATFORMS"] = "cpu"
  return True


def _glibc_supports_hugetlb() -> bool:
  if sys.platform != "linux":
    return False
  lib, version = platform.libc_ver()
  if lib != "glibc" or not version:
    return False
  try:
    major, minor = (int(x) for x in version.split(".")[:2])
  except ValueError:
    return False
  return (major, minor) >= (2, 35)


def _thp_available(path: str = _THP_SETTING) -> bool:
  """Transparent huge pages usable via madvise ('always' or 'madvise' selected)."""
  try:
    with open(path) as f:
      return "[never]" not in f.read()
  except OSError:
    return False


def tuned_env(env: Mapping[str, str]) -> Optional[dict[str, str]]:
  """The environment with the malloc tunable added, or None if nothing should change.

  None when opted out (`PREFJAX_HOST_MALLOC=0`), already applied, on an accelerator host
  (`accelerator_host`), or when the host cannot use it.
  """
  if env.get(OPT_OUT_VAR, "1").strip().lower() in ("0", "false", "no", "off"):
    return None
  if env.get(_REEXEC_MARK) or "glibc.malloc.hugetlb" in env.get("GLIBC_TUNABLES", ""):
    return None
  if accelerator_host(env) is not None:
    return None
  if not (_glibc_supports_hugetlb() and _thp_available()):
    return None
  out = dict(env)
  current = env.get("GLIBC_TUNABLES", "")
  out["GLIBC_TUNABLES"] = f"{current}:{TUNABLE}" if current else TUNABLE
  out[_REEXEC_MARK] = "1"
  return out


def apply_to(env: MutableMapping[str, str]) -> bool:
  """Adds the tunable to `env` (for a subprocess about to be started); True if it changed."""
  new = tuned_env(env)
  if new is None:
    return False
  env.update(new)
  return True


def reexec_with_tuned_malloc() -> None:
  """Re-executes this process (same interpreter and argv) with the tunable set, if useful.

  Call first thing in a command-line entry point, before JAX is imported. Returns normally
  when nothing needs to change; otherwise does not return.
  """
  new = tuned_env(os.environ)
  if new is None or "jax" in sys.modules:
    return
  argv = list(getattr(sys, "orig_argv", []) or [])
  if not argv:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, [sys.executable] + argv[1:], new)
  except OSError:
    return  # keep running untuned rather than fail
