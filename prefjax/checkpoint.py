"""Orbax checkpointing of the train state together with the grain iterator state.

One `CheckpointManager` under `<workdir>/checkpoints`: async saves, the last
`keep` checkpoints plus the best one by an eval metric, each holding
`state` (the `TrainState`, restored straight into its target shardings) and
`data` (the grain iterator position, one file per process). A checkpoint is
only visible once complete, so a run killed mid-save resumes from the previous one.

Integrity. Each step carries `prefjax_checksums.json`: the size and CRC-32 of every file of
its items (`state/`, `data/`, `metrics/`; Orbax's own top-level metadata files are left out,
Orbax rewrites them). Process 0 writes it when Orbax has finalized the step's items and before
Orbax renames the temporary folder into place (AsyncOptions.post_finalization_callback), so a
visible step with checksums is complete; synchronous saves write it right after the save.
Restoring verifies the newest step first: a step whose files differ from their checksums
(bit flips, truncation, deleted files) is reported with the step and the file, moved to
`<workdir>/checkpoints.damaged/<step>` (never deleted) and the next older step is tried; if
none is intact the run stops with one line. A step without checksums (written by an older
prefjax, or by a run killed between the rename and the checksums of a synchronous save) is
restored as it is. Rotation keeps the newest `keep` steps, and since damaged steps are moved
out of Orbax's folder it never counts them: the newest verified step is never rotated away by
damaged ones. Object stores (gs://) get no checksums: reading every file back would cost a
full download, and GCS already checks each object's CRC-32C on upload; a step there is
verified by Orbax's commit marker only.
"""
from __future__ import annotations

import errno
import glob
import json
import logging
import os
import shutil
import time
import zlib
from typing import Any, Optional

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

MANIFEST = "prefjax_checksums.json"
_TMP_MARKER = ".orbax-checkpoint-tmp"


class CheckpointError(RuntimeError):
  """A checkpoint directory that cannot be used (unwritable, full, corrupt)."""


def _local(path: str) -> bool:
  return "://" not in str(path)


def _item_files(step_dir: str) -> list[str]:
  """Files of a step's items (everything below its sub-folders), relative, sorted."""
  out = []
  for root, _, files in os.walk(step_dir):
    rel_root = os.path.relpath(root, step_dir)
    if rel_root == ".":
      continue
    out += [os.path.join(rel_root, f) for f in files]
  return sorted(out)


def _crc32(path: str) -> int:
  crc = 0
  with open(path, "rb") as f:
    while chunk := f.read(8 << 20):
      crc = zlib.crc32(chunk, crc)
  return crc


def write_manifest(step_dir: str) -> None:
  """Writes `step_dir/prefjax_checksums.json` (size and CRC-32 of each item file)."""
  files = {rel: [os.path.getsize(os.path.join(step_dir, rel)), _crc32(os.path.join(step_dir, rel))]
           for rel in _item_files(step_dir)}
  tmp = os.path.join(step_dir, MANIFEST + ".tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump({"version": 1, "algorithm": "crc32", "files": files}, f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(step_dir, MANIFEST))


def verify_step(step_dir: str) -> Optional[str]:
  """None when the step matches its checksums (or has none); else what is wrong, naming the file.

  Returns "unverified" (exactly) for a step without checksums.
  """
  path = os.path.join(step_dir, MANIFEST)
  if not os.path.exists(path):
    return "unverified"
  try:
    with open(path, encoding="utf-8") as f:
      files = json.load(f)["files"]
  except (OSError, ValueError, KeyError) as e:
    return f"its checksum file {MANIFEST} is unreadable ({e})"
  for rel, (size, crc) in sorted(files.items()):
    full = os.path.join(step_dir, rel)
    if not os.path.exists(full):
      return f"{rel} is missing"
    actual = os.path.getsize(full)
    if actual != size:
      return f"{rel} has {actual} bytes, {size} were written"
    if _crc32(full) != crc:
      return f"{rel} does not match its checksum (damaged contents)"
  extra = sorted(set(_item_files(step_dir)) - set(files))
  if extra:
    return f"{extra[0]} was not part of the saved step"
  return None


def _free_mib(path: str) -> Optional[float]:
  if not _local(path):
    return None
  while path and not os.path.exists(path):
    path = os.path.dirname(path)
  try:
    return shutil.disk_usage(path or ".").free / 2**20
  except OSError:
    return None


def _policy(keep: int, best_metric: Optional[str], best_mode: str):
  latest = cm.LatestN(n=max(1, int(keep)))
  if not best_metric:
    return latest
  best = cm.BestN(get_metric_fn=lambda m: float(m[best_metric]), reverse=(best_mode == "min"),
                  n=1, keep_checkpoints_without_metrics=False)
  return cm.AnyPreservationPolicy([latest, best])


class Checkpointer:
  """Saves / restores `(state, data iterator)` pairs by step, with verified checkpoints.

  Args:
    directory: the checkpoints folder (local path or gs://).
    keep: how many of the latest checkpoints to keep.
    best_metric: eval metric name (e.g. `eval/accuracy`) whose best checkpoint is also
      kept; None keeps only the latest.
    best_mode: "max" or "min" for `best_metric`.
    async_save: write in a background thread while training continues.
  """

  def __init__(self, directory: str, *, keep: int = 3, best_metric: Optional[str] = None,
               best_mode: str = "max", async_save: bool = True):
    self.directory = str(directory)
    self.best_metric = best_metric
    self._best_mode = best_mode
    self._async = bool(async_save)
    self._pending_step: Optional[int] = None
    self._checksums = _local(self.directory)
    best_fn = (lambda m: float(m[best_metric])) if best_metric else None
    async_options = None
    if self._async and self._checksums:
      async_options = ocp.AsyncOptions(post_finalization_callback=self._on_finalized)
    options = ocp.CheckpointManagerOptions(
        best_fn=best_fn, best_mode=best_mode,  # writes metrics with each checkpoint
        preservation_policy=_policy(keep, best_metric, best_mode),
        enable_async_checkpointing=self._async, create=True, async_options=async_options)
    self._mngr = ocp.CheckpointManager(self.directory, options=options)

  # ------------------------------------------------------------------ integrity

  @property
  def damaged_directory(self) -> str:
    """Where damaged steps are moved: `<workdir>/checkpoints.damaged`."""
    return self.directory.rstrip("/") + ".damaged"

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(int(step)))

  def _on_finalized(self) -> None:
    """Orbax callback once a step's items are finalized, before the step is renamed into place."""
    step = self._pending_step
    if step is None or jax.process_index() != 0:
      return
    tmp = sorted(glob.glob(os.path.join(self.directory, f"{step}{_TMP_MARKER}*")),
                 key=os.path.getmtime)
    write_manifest(tmp[-1] if tmp else self._step_dir(step))

  def verify(self, step: int) -> Optional[str]:
    """None when `step` is intact (or has no checksums: "unverified"), else the damage."""
    if not self._checksums:
      return None
    if not os.path.isdir(self._step_dir(step)):
      return f"folder {self._step_dir(step)} is missing"
    problem = verify_step(self._step_dir(step))
    return None if problem == "unverified" else problem

  def _move_aside(self, step: int) -> str:
    os.makedirs(self.damaged_directory, exist_ok=True)
    dest = os.path.join(self.damaged_directory, str(step))
    if os.path.exists(dest):
      dest += f".{int(time.time())}"
    shutil.move(self._step_dir(step), dest)
    return dest

  def latest_intact_step(self, *, move_damaged: bool = True) -> Optional[int]:
    """The newest step whose files match their checksums (None when there is no checkpoint).

    Damaged newer steps are logged (step and file) and, with `move_damaged`, moved to
    `damaged_directory`. Process 0 checks; every process gets its answer.

    Raises:
      CheckpointError: checkpoints exist but none is intact.
    """
    steps = sorted(self._mngr.all_steps(), reverse=True)
    chosen, damaged = -1, []
    if jax.process_index() == 0:
      for step in steps:
        problem = self.verify(step)
        if problem is None:
          chosen = step
          break
        damaged.append((step, problem))
      for step, problem in damaged:
        where = ""
        if move_damaged:
          where = f"; moved to {self._move_aside(step)}"
        logging.warning("checkpoint step %d in %s is damaged: %s%s", step, self.directory,
                        problem, where)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      chosen = int(multihost_utils.broadcast_one_to_all(np.int64(chosen)))
      n_damaged = int(multihost_utils.broadcast_one_to_all(np.int64(len(damaged))))
      multihost_utils.sync_global_devices("prefjax_checkpoint_verified")
    else:
      n_damaged = len(damaged)
    if n_damaged and move_damaged:
      self._mngr.reload()
    if chosen < 0:
      if n_damaged:
        first = f" (step {damaged[0][0]}: {damaged[0][1]})" if damaged else ""
        raise CheckpointError(
            f"every checkpoint in {self.directory} is damaged{first}"
            + (f"; they were moved to {self.damaged_directory}" if move_damaged else "")
            + ". Remove the workdir's checkpoints folder to start over.")
      return None
    return chosen

  def check_for_errors(self) -> None:
    """Raises `CheckpointError` (one line) when a background save has failed."""
    try:
      self._mngr.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      self._raise_save_error(e)

  def _raise_save_error(self, e: BaseException, step: Optional[int] = None) -> None:
    step = self._pending_step if step is None else step
    self._pending_step = None
    reason = _reason(e)
    free = _free_mib(self.directory)
    room = f"; {free:.0f} MiB free there" if free is not None else ""
    latest = self._mngr.latest_step()
    last = (f"; the last complete checkpoint is step {latest}" if latest is not None
            else "; no complete checkpoint yet")
    raise CheckpointError(f"checkpoint save of step {step} in {self.directory} failed: "
                          f"{reason}{room}{last}") from None

  # ------------------------------------------------------------------ save / restore

  def latest_step(self) -> Optional[int]:
    """Step of the last complete checkpoint, or None."""
    return self._mngr.latest_step()

  def best_step(self) -> Optional[int]:
    """Kept step with the best `best_metric` (None without metrics)."""
    if not self.best_metric:
      return None
    scored = []
    for step in self._mngr.all_steps():
      m = self._mngr.metrics(step)
      if m and self.best_metric in m:
        scored.append((float(m[self.best_metric]), step))
    if not scored:
      return None
    pick = max if self._best_mode == "max" else min
    return pick(scored)[1]

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def save(self, step: int, state: Any, data_iter: Any = None,
           metrics: Optional[dict[str, float]] = None, force: bool = False) -> bool:
    """Starts an (async) save of `state` and the iterator position; returns whether it saved.

    Raises:
      CheckpointError: this save, or the previous background one, failed (disk full, ...).
    """
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    if metrics is not None and self.best_metric:
      metrics = {k: float(v) for k, v in metrics.items()}
      if self.best_metric not in metrics:
        metrics = None
    else:
      metrics = None
    self.check_for_errors()
    try:
      self._mngr.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._raise_save_error(e)
    self._pending_step = int(step)
    try:
      saved = self._mngr.save(int(step), args=ocp.args.Composite(**items), metrics=metrics,
                              force=force)
    except Exception as e:  # pylint: disable=broad-except
      if not _is_io_error(e):
        raise
      self._raise_save_error(e, int(step))
    if saved and not self._async and self._checksums and jax.process_index() == 0:
      write_manifest(self._step_dir(step))
    return saved

  def restore(self, step: int, abstract_state: Any, data_iter: Any = None) -> Any:
    """Restores the state at `step` into the shardings carried by `abstract_state`.

    When `data_iter` is given its position is restored in place.

    Raises:
      CheckpointError: the step cannot be read into this state (one line).
    """
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
      restored = self._mngr.restore(int(step), args=ocp.args.Composite(**items))
    except (ValueError, KeyError, TypeError, OSError, AttributeError) as e:
      raise CheckpointError(
          f"checkpoint step {step} in {self.directory} cannot be restored into this run's "
          f"state: {_reason(e)}. Was it written with another model or config?") from e
    return restored["state"]

  def restore_params(self, step: Optional[int], abstract_params: Any) -> Any:
    """Restores only `state.params` (e.g. to initialise a model from another run)."""
    return self.restore_subtrees(step, {"params": abstract_params})["params"]

  def restore_subtrees(self, step: Optional[int], target: dict[str, Any]) -> dict[str, Any]:
    """Restores the named top-level fields of the saved state (e.g. `params`, `ref_params`).

    `step` None: the newest intact step (damaged newer ones are skipped, not moved). A given
    step must be intact.

    Raises:
      CheckpointError: no checkpoint, the asked step is damaged or missing, or it does not fit.
    """
    if step is None:
      step = self.latest_intact_step(move_damaged=False)
      if step is None:
        raise CheckpointError(f"no checkpoint in {self.directory}")
    else:
      if int(step) not in self._mngr.all_steps():
        raise CheckpointError(f"no checkpoint step {step} in {self.directory}; it has "
                              f"{sorted(self._mngr.all_steps())}")
      problem = self.verify(int(step))
      if problem is not None:
        raise CheckpointError(f"checkpoint step {step} in {self.directory} is damaged: "
                              f"{problem}")
    try:
      restored = self._mngr.restore(
          int(step), args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
              item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
              partial_restore=True)))
    except (ValueError, KeyError, TypeError, OSError, AttributeError) as e:
      raise CheckpointError(
          f"checkpoint step {step} in {self.directory} does not hold parameters of this "
          f"model: {_reason(e)}") from e
    return restored["state"]

  def wait(self) -> None:
    """Blocks until pending async saves are complete.

    Raises:
      CheckpointError: a background save failed.
    """
    try:
      self._mngr.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._raise_save_error(e)
    self.check_for_errors()

  def reached_preemption(self, step: int) -> bool:
    """True when the TPU preemption notice asks for a save at `step` (multi-host safe)."""
    return self._mngr.reached_preemption(int(step))

  def close(self) -> None:
    try:
      self._mngr.wait_until_finished()
    except Exception:  # pylint: disable=broad-except
      pass  # already reported by wait() / save(); closing must not raise again
    self._mngr.close()


def _reason(e: BaseException) -> str:
  """The innermost message of an (Orbax / TensorStore / thread) exception, one line."""
  seen = set()
  while e.__cause__ is not None and id(e) not in seen:
    seen.add(id(e))
    e = e.__cause__
  if isinstance(e, OSError) and e.errno is not None:
    return f"{os.strerror(e.errno)} [errno {errno.errorcode.get(e.errno, e.errno)}]"
  text = str(e).strip().splitlines()
  line = text[0] if text else type(e).__name__
  # TensorStore nests "Error writing X in OCDBT database at Y: Failed writing: "F": <cause>":
  # keep the innermost cause and the file.
  if 'Failed writing: "' in line:
    target, _, cause = line.rpartition('Failed writing: "')[2].partition('": ')
    line = f"{cause} (writing {target})" if cause else line
  return line[:1000]


def _is_io_error(e: BaseException) -> bool:
  while e is not None:
    if isinstance(e, OSError):
      return True
    e = e.__cause__ or e.__context__
  return False


def check_writable(workdir: str, min_free_bytes: int = 0) -> None:
  """Fails fast, with a message, when `workdir` is not writable or has too little space.

  Raises:
    CheckpointError: naming the directory and the problem.
  """
  if "://" in workdir:  # object stores: nothing to pre-check cheaply
    return
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_probe_{jax.process_index()}")
    with open(probe, "wb") as f:
      f.write(b"\0" * 4096)
      f.flush()
      os.fsync(f.fileno())
    os.remove(probe)
  except OSError as e:
    raise CheckpointError(
        f"workdir {workdir!r} is not writable: {e.strerror or e}. "
        "Pick a writable --workdir.") from e
  free = shutil.disk_usage(workdir).free
  if free < min_free_bytes:
    raise CheckpointError(
        f"workdir {workdir!r} has {_size(free)} free but a checkpoint needs about "
        f"{_size(min_free_bytes)}; free some space or pick another --workdir.")


def _size(n: float) -> str:
  """Bytes as GiB, or MiB under 1 GiB."""
  return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
