"""What a run directory promises: one writer at a time, and a config that describes its steps.

Lock. `lock(workdir)` is held for a run's lifetime by process 0 (the other processes of a
multi-host run write only their own checkpoint shards). On a local or NFS file system it is
an exclusive `flock` on `<workdir>/.prefjax.lock`, which the kernel releases when the process
dies, so the lock of a killed run is stale at once and the next run takes it over; the file
names the holder (host, pid, start time, command) for the refusal message. Object stores
(gs://) have no locks without a storage client, so there the lock is a file with the holder
and a heartbeat refreshed every minute: a run refuses while another's heartbeat is under
10 minutes old and takes over an older one (best effort: two runs started within the same
second can both pass). Locks are re-entrant within a process (a task that trains in its own
workdir takes it once per call).

Config on resume. `check_resume(saved, new, step)` compares the config a workdir's checkpoints
were written with (`config.json`) against the new one, key by key (dotted names):
  * keys that define the state's shapes or the data stream (`REFUSE_PREFIXES`: the task, the
    model and its resolved architecture, LoRA, tokenizer, lengths, layout, data files and
    format, batch size, the seed of the data order, reference mode / init, loss name) refuse
    the resume with a diff;
  * run-length and reporting keys (`SILENT_PREFIXES`: total_steps, frequencies, logging,
    kernels, the compilation cache) change silently;
  * everything else (learning rate, schedule, loss hyperparameters, ...) proceeds with a
    warning naming old and new values; the trainer then keeps the previous config as
    `config.<step>.json` (the config that produced steps up to `<step>`), so the workdir always
    says which config produced which steps.
With `reference.mode=precomputed` the length of the run is data-defining too: the cached
reference log-probs cover the examples of the first `total_steps` steps only.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import sys
import threading
import time
from typing import Any, Iterator, Optional

LOCK_FILE = ".prefjax.lock"
HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0

REFUSE_PREFIXES = (
    "task", "model.", "resolved_model.", "data.tokenizer", "data.max_len",
    "data.max_prompt_len", "data.max_response_len", "data.layout", "data.task_layout",
    "data.max_pairs_per_row", "data.train", "data.eval", "data.format", "data.kind",
    "data.split_fraction", "data.holdout", "data.batch_size", "data.chat_template",
    "data.seed", "data.shuffle", "reference.mode", "reference.init", "loss.name",
    "seed",  # seeds the data order that the saved iterator position refers to
)
SILENT_PREFIXES = (
    "total_steps", "num_epochs", "eval.every_steps", "eval.num_batches", "eval.diagnostics",
    "eval.topk", "log.", "ckpt.every_steps", "ckpt.keep", "ckpt.async_save",
    "train.compilation_cache_dir", "train.debug_", "kernels.", "resolved_kernels.",
    "distributed.", "export.", "train.logps_", "data.num_workers", "data.worker_buffer_size",
    "data.prefetch",
)
# Keys that stay data-defining only where a precomputed reference covers a fixed run length.
_PRECOMPUTED_LENGTH_KEYS = ("total_steps", "num_epochs")


class WorkdirError(RuntimeError):
  """The workdir cannot be used as asked (held by another run, config mismatch)."""


# ------------------------------------------------------------------------------- lock


def _holder() -> dict[str, Any]:
  return {"host": socket.gethostname(), "pid": os.getpid(),
          "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "command": " ".join(sys.argv)[:500], "heartbeat": time.time()}


def _describe(h: dict[str, Any]) -> str:
  return (f"pid {h.get('pid', '?')} on {h.get('host', '?')}, started {h.get('started', '?')}: "
          f"{h.get('command', '?')}")


class _LocalLock:
  """flock on `<workdir>/.prefjax.lock`; the kernel releases it when the process dies."""

  def __init__(self, workdir: str):
    import fcntl  # pylint: disable=g-import-not-at-top
    self._fcntl = fcntl
    self.path = os.path.join(workdir, LOCK_FILE)
    self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      try:
        holder = json.loads(os.pread(self._fd, 65536, 0).decode("utf-8") or "{}")
      except (OSError, ValueError):
        holder = {}
      os.close(self._fd)
      raise WorkdirError(
          f"workdir {workdir} is in use by another prefjax run ({_describe(holder)}); wait for "
          "it to finish, stop it, or pick another --workdir") from None
    os.ftruncate(self._fd, 0)
    os.pwrite(self._fd, json.dumps(_holder()).encode("utf-8"), 0)
    os.fsync(self._fd)

  def release(self) -> None:
    self._fcntl.flock(self._fd, self._fcntl.LOCK_UN)
    os.close(self._fd)


class _ObjectStoreLock:
  """A holder file with a heartbeat (object stores have no advisory locks)."""

  def __init__(self, workdir: str):
    from etils import epath  # pylint: disable=g-import-not-at-top
    self.path = epath.Path(workdir) / LOCK_FILE
    me = _holder()
    if self.path.exists():
      try:
        other = json.loads(self.path.read_text())
      except ValueError:
        other = {}
      age = time.time() - float(other.get("heartbeat", 0))
      if age < STALE_AFTER_S:
        raise WorkdirError(
            f"workdir {workdir} is in use by another prefjax run ({_describe(other)}, heartbeat "
            f"{age:.0f} s ago); wait for it to finish, stop it, or pick another --workdir")
      logging.warning("taking over the lock of %s: its holder's heartbeat is %.0f s old (%s)",
                      workdir, age, _describe(other))
    self._holder = me
    self.path.write_text(json.dumps(me))
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._beat, daemon=True, name="prefjax-lock")
    self._thread.start()

  def _beat(self) -> None:
    while not self._stop.wait(HEARTBEAT_S):
      self._holder["heartbeat"] = time.time()
      try:
        self.path.write_text(json.dumps(self._holder))
      except OSError as e:  # a transient store error must not kill the run
        logging.warning("could not refresh the workdir lock %s: %s", self.path, e)

  def release(self) -> None:
    self._stop.set()
    try:
      self.path.unlink()
    except OSError:
      pass


_HELD: dict[str, list] = {}  # workdir -> [lock, depth]
_HELD_GUARD = threading.Lock()


@contextlib.contextmanager
def lock(workdir: str, *, process_index: Optional[int] = None) -> Iterator[None]:
  """Holds `workdir`'s one-writer lock (process 0 only; re-entrant within a process).

  Raises:
    WorkdirError: another run holds it (the message names the holder).
  """
  if process_index is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index()
  if process_index != 0:
    yield
    return
  local = "://" not in workdir
  key = os.path.realpath(workdir) if local else workdir.rstrip("/")
  with _HELD_GUARD:
    entry = _HELD.get(key)
    if entry is None:
      try:
        if local:
          os.makedirs(workdir, exist_ok=True)
        entry = _HELD[key] = [(_LocalLock if local else _ObjectStoreLock)(workdir), 0]
      except OSError as e:
        raise WorkdirError(f"workdir {workdir!r} is not writable: {e.strerror or e}. Pick a "
                           "writable --workdir.") from None
    entry[1] += 1
  try:
    yield
  finally:
    with _HELD_GUARD:
      entry[1] -= 1
      if entry[1] == 0:
        entry[0].release()
        del _HELD[key]


# ------------------------------------------------------------------------- config


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """Nested dicts -> {"a.b.c": leaf} (lists and tuples are leaves)."""
  if not isinstance(tree, dict):
    return {prefix: tree}
  out: dict[str, Any] = {}
  for k, v in tree.items():
    out.update(flatten(v, f"{prefix}{k}." if isinstance(v, dict) else f"{prefix}{k}"))
  return out


def _matches(key: str, prefixes: tuple[str, ...]) -> bool:
  """A prefix ending in "." or "_" matches what starts with it; any other matches the key
  itself and the keys below it."""
  for p in prefixes:
    if p.endswith((".", "_")):
      if key.startswith(p):
        return True
    elif key == p or key.startswith(p + "."):
      return True
  return False


def classify(key: str, *, precomputed_reference: bool = False) -> str:
  """"refuse", "silent" or "warn" for a changed config key (dotted name)."""
  if precomputed_reference and key in _PRECOMPUTED_LENGTH_KEYS:
    return "refuse"
  if _matches(key, REFUSE_PREFIXES):
    return "refuse"
  if _matches(key, SILENT_PREFIXES):
    return "silent"
  return "warn"


def _same(a: Any, b: Any) -> bool:
  norm = lambda x: json.loads(json.dumps(x, sort_keys=True, default=str))  # noqa: E731
  return norm(a) == norm(b)


def config_changes(saved: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
  """{key: (old, new)} for every dotted key whose value differs (missing keys are None)."""
  a, b = flatten(saved), flatten(new)
  return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
          if not _same(a.get(k), b.get(k))}


def check_resume(saved: dict[str, Any], new: dict[str, Any], step: int,
                 where: str = "the workdir") -> dict[str, tuple[Any, Any]]:
  """Compares the config of a run's checkpoints with the config resuming it at `step`.

  Returns the changes that proceed with a warning (logged here), {} when there are none.

  Raises:
    WorkdirError: a shape- or data-defining key changed; the message lists each as
      `key: old -> new`.
  """
  precomputed = (flatten(saved).get("reference.mode") == "precomputed")
  changes = config_changes(saved, new)
  refused = {k: v for k, v in changes.items()
             if classify(k, precomputed_reference=precomputed) == "refuse"}
  if refused:
    diff = "; ".join(f"{k}: {o!r} -> {n!r}" for k, (o, n) in refused.items())
    raise WorkdirError(
        f"{where} holds checkpoints (step {step}) of a run with another config, and these keys "
        f"define its state or data: {diff}. Resume with the same values, or pick another "
        "--workdir")
  warned = {k: v for k, v in changes.items()
            if classify(k, precomputed_reference=precomputed) == "warn"}
  for k, (o, n) in warned.items():
    logging.warning("resuming %s at step %d with config.%s changed: %r -> %r", where, step, k, o, n)
  return warned
