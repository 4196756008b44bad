r"""prefjax command line: `python -m prefjax.main --config=configs/NAME.py[:ARG] --workdir=DIR`.

Thin: parse flags, validate the config, dispatch on `config.task`. Re-running the same
command resumes from the last complete checkpoint in `DIR/checkpoints`.

  python -m prefjax.main --config=configs/quickstart.py --workdir=/tmp/prefjax_quickstart
  python -m prefjax.main --config=configs/dpo_gemma7b.py --workdir=gs://bucket/run \
      --config.loss.beta=0.05
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable

from absl import app
from absl import flags
from ml_collections import config_flags

from prefjax import flag_parsing

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Recipe file (configs/NAME.py[:ARG]); override keys with --config.a.b=v.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, config.")


def _train(config: Any, workdir: str) -> None:
  from prefjax.train import loop  # pylint: disable=g-import-not-at-top
  out = loop.run(config, workdir)
  logging.info("done: %s", {k: v for k, v in out.items() if not k.startswith("eval/diag")})


def _export(config: Any, workdir: str) -> None:
  from prefjax.train import export  # pylint: disable=g-import-not-at-top
  path = export.export(config, workdir)
  print(f"exported to {path}")


# Tasks whose entry points live in other modules: task -> (module, function).
EXTERNAL_TASKS = {
    "eval_reward": ("prefjax.eval.tasks", "run_eval_reward"),
    "eval_implicit_reward": ("prefjax.eval.tasks", "run_eval_implicit_reward"),
    "generate": ("prefjax.eval.generate", "run_generate"),
    "iterative_dpo": ("prefjax.train.iterative", "run_iterative_dpo"),
}


def _external(module: str, name: str) -> Callable[[Any, str], None] | None:
  """The entry point `module.name`, or None when this build does not have it."""
  import importlib  # pylint: disable=g-import-not-at-top
  try:
    return getattr(importlib.import_module(module), name)
  except (ImportError, AttributeError):
    return None


def task_table() -> dict[str, Callable[[Any, str], None]]:
  """`config.task` -> entry point (training tasks, export, and the eval / generate /
  iterative DPO tasks when their modules are present)."""
  table = {"sft": _train, "reward": _train, "preference": _train, "kto": _train,
           "export": _export}
  for task, (module, name) in EXTERNAL_TASKS.items():
    fn = _external(module, name)
    if fn is not None:
      table[task] = fn
  return table


class UsageError(Exception):
  """A user error reported as one line on stderr, exit status 2."""


def dispatch(config: Any, workdir: str) -> None:
  """Validates `config` and runs its task in `workdir`."""
  from prefjax.train import builders, validation as validate  # pylint: disable=g-import-not-at-top
  table = task_table()
  task = config.get("task")
  if task not in table:
    known = sorted(table)
    missing = sorted(set(EXTERNAL_TASKS) - set(table))
    hint = f" (not in this build: {', '.join(missing)})" if missing else ""
    raise UsageError(f"unknown config.task {task!r}; tasks: {', '.join(known)}{hint}")
  builders.maybe_initialize_distributed(config.get("distributed"))
  validate.validate(config)
  from prefjax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  with workdir_lib.lock(workdir):  # one run per workdir (process 0 holds it)
    out = table[task](config, workdir)
  if task in EXTERNAL_TASKS and out is not None:
    logging.info("done: %s", out)


class _QuietLibraries(logging.Filter):
  """Drops INFO chatter of orbax / jax / grain; keeps their warnings and prefjax's info.

  Orbax logs a failed background save once per thread, each with its traceback; the run then
  stops with one `error:` line naming the step and the cause, so their tracebacks are cut to
  the message line.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    noisy = any(s in record.pathname for s in ("/orbax/", "/jax/", "/grain/", "/jaxlib/"))
    if (record.name == "asyncio" and "never retrieved" in str(record.msg)
        and "orbax" in str(record.msg)):
      return False  # each write task of a failed save; the run's error line names the cause
    if "/orbax/" in record.pathname and record.exc_info:
      record.exc_info, record.exc_text = None, None
    return record.levelno >= logging.WARNING or not noisy


def _quiet_closed_event_loops(default_hook):
  """An unraisable-exception hook that drops TensorStore callbacks into the event loops of a
  failed (already reported) Orbax save, and passes everything else on."""
  def hook(unraisable):
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
      return
    default_hook(unraisable)
  return hook


def main(argv: list[str]) -> None:
  for h in logging.getLogger().handlers + logging.getLogger("absl").handlers:
    h.addFilter(_QuietLibraries())
  sys.unraisablehook = _quiet_closed_event_loops(sys.unraisablehook)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required")
  config = flag_parsing.config_value(_CONFIG)
  if config is None:
    raise app.UsageError("--config is required (e.g. --config=configs/quickstart.py)")
  from prefjax import checkpoint, data, workdir  # pylint: disable=g-import-not-at-top
  from prefjax.train import loop, validation as validate  # pylint: disable=g-import-not-at-top
  user_errors = (UsageError, validate.ConfigError, checkpoint.CheckpointError,
                 loop.NonFiniteLossError, data.DataError, workdir.WorkdirError)
  _maybe_enable_compilation_cache(config)
  try:
    dispatch(config, os.path.expanduser(_WORKDIR.value))
  except loop.StoppedBySignal as e:
    # Not a success: schedulers see 128 + the signal (143 SIGTERM, 130 SIGINT), as a shell does.
    print(str(e), file=sys.stderr)
    sys.exit(128 + int(e.signum))
  except user_errors as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def _maybe_enable_compilation_cache(config) -> None:
  """Turns on JAX's persistent compilation cache at `train.compilation_cache_dir`, if set."""
  path = (config.get("train") or {}).get("compilation_cache_dir")
  if not path:
    return
  import jax  # pylint: disable=g-import-not-at-top
  path = os.path.expanduser(path)
  if "://" not in path:
    os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  logging.info("persistent compilation cache: %s", path)


def run() -> None:
  """Entry point (`python -m prefjax.main`).

  On a Linux/glibc CPU host it first re-executes itself with glibc's huge-page malloc tunable
  (prefjax/host_env.py; opt out with PREFJAX_HOST_MALLOC=0).
  """
  from prefjax import host_env  # pylint: disable=g-import-not-at-top
  host_env.pin_cpu_platform(os.environ)  # no TPU probing (and libtpu's errors) on CPU hosts
  host_env.reexec_with_tuned_malloc()
  app.run(main, flags_parser=flag_parsing.parse_flags)


if __name__ == "__main__":
  run()
