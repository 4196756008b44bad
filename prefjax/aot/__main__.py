r"""`python -m prefjax.aot`: will this recipe fit a TPU slice, and what does a step cost there?

  python -m prefjax.aot --config=configs/dpo_gemma7b.py --topology=v5e:4x4
  python -m prefjax.aot --config=configs/rm_gemma2b.py --topology=v5e:2x4 \
      --config.data.batch_size=64 --out=/tmp/rm_v5e8.json

Compiles exactly the programs `prefjax.main` would run for the config (train step with its
shardings and donation; eval step, diagnostics and reference pass when the run has them) for
the named TPU slice, using libtpu's compiler on this machine: no TPU is needed
(`pip install "jax[tpu]==0.10.2"` brings libtpu). Prints a table, then one JSON line with at
least `fits`; `--out` also writes the JSON to a file.
"""
from __future__ import annotations

import json
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from prefjax import flag_parsing

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Recipe file (configs/NAME.py[:ARG]); override keys with --config.a.b=v.",
    lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice, e.g. v5e:4x4, v4:2x2x2, v6e:2x4.")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices joined over DCN (multi-slice).")
_PROGRAMS = flags.DEFINE_list("programs", ["train", "eval", "diagnostics", "reference"],
                              "Which of the run's programs to compile (those it has).")
_OUT = flags.DEFINE_string("out", None, "Also write the JSON report to this file.")


def _compile_only_environment() -> None:
  """libtpu compiles for the topology without a TPU; keep it from probing for hosts."""
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-16")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  # Several compile-only processes may share a machine (libtpu otherwise takes a lockfile).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_platforms", "cpu")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = flag_parsing.config_value(_CONFIG)
  if config is None:
    raise app.UsageError("--config is required (e.g. --config=configs/dpo_gemma7b.py)")
  if not _TOPOLOGY.value:
    raise app.UsageError("--topology is required (e.g. --topology=v5e:4x4)")
  _compile_only_environment()
  from prefjax.aot import chips, compile as compile_lib  # pylint: disable=g-import-not-at-top
  from prefjax.train import validation  # pylint: disable=g-import-not-at-top
  try:
    topo = chips.parse_topology(_TOPOLOGY.value, _NUM_SLICES.value)
    _check_libtpu()
    report = compile_lib.compile_recipe(config, topo, programs=tuple(_PROGRAMS.value))
  except (ValueError, validation.ConfigError, ImportError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(compile_lib.format_table(report))
  line = json.dumps(report, sort_keys=True)
  if _OUT.value:
    with open(_OUT.value, "w", encoding="utf-8") as f:
      f.write(line + "\n")
  print(line)


def _check_libtpu() -> None:
  try:
    import libtpu  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    raise ImportError("compiling for TPU needs libtpu: pip install 'jax[tpu]==0.10.2' "
                      "(it installs on machines without a TPU)") from None


def run() -> None:
  app.run(main, flags_parser=flag_parsing.parse_flags)


if __name__ == "__main__":
  run()
