"""Orbax checkpointing of the train state together with the grain iterator state.

One `CheckpointManager` under `<workdir>/checkpoints`: async saves, the last
`keep` checkpoints plus the best one by an eval metric, each holding
`state` (the `TrainState`, restored straight into its target shardings) and
`data` (the grain iterator position, one file per process). A checkpoint is
only visible once complete, so a run killed mid-save resumes from the previous one.
"""
from __future__ import annotations

import os
import shutil
from typing import Any, Optional

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm


class CheckpointError(RuntimeError):
  """A checkpoint directory that cannot be used (unwritable, full, corrupt)."""


def _policy(keep: int, best_metric: Optional[str], best_mode: str):
  latest = cm.LatestN(n=max(1, int(keep)))
  if not best_metric:
    return latest
  best = cm.BestN(get_metric_fn=lambda m: float(m[best_metric]), reverse=(best_mode == "min"),
                  n=1, keep_checkpoints_without_metrics=False)
  return cm.AnyPreservationPolicy([latest, best])


class Checkpointer:
  """Saves / restores `(state, data iterator)` pairs by step.

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
    self.directory = directory
    self.best_metric = best_metric
    self._best_mode = best_mode
    best_fn = (lambda m: float(m[best_metric])) if best_metric else None
    options = ocp.CheckpointManagerOptions(
        best_fn=best_fn, best_mode=best_mode,  # writes metrics with each checkpoint
        preservation_policy=_policy(keep, best_metric, best_mode),
        enable_async_checkpointing=async_save, create=True)
    self._mngr = ocp.CheckpointManager(directory, options=options)

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
    """Starts an (async) save of `state` and the iterator position; returns whether it saved."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    if metrics is not None and self.best_metric:
      metrics = {k: float(v) for k, v in metrics.items()}
      if self.best_metric not in metrics:
        metrics = None
    else:
      metrics = None
    return self._mngr.save(int(step), args=ocp.args.Composite(**items), metrics=metrics,
                           force=force)

  def restore(self, step: int, abstract_state: Any, data_iter: Any = None) -> Any:
    """Restores the state at `step` into the shardings carried by `abstract_state`.

    When `data_iter` is given its position is restored in place.
    """
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self._mngr.restore(int(step), args=ocp.args.Composite(**items))
    return restored["state"]

  def restore_params(self, step: Optional[int], abstract_params: Any) -> Any:
    """Restores only `state.params` (e.g. to initialise a model from another run)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    target = {"params": abstract_params}
    restored = self._mngr.restore(
        int(step), args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True)))
    return restored["state"]["params"]

  def wait(self) -> None:
    """Blocks until pending async saves are complete."""
    self._mngr.wait_until_finished()

  def reached_preemption(self, step: int) -> bool:
    """True when the TPU preemption notice asks for a save at `step` (multi-host safe)."""
    return self._mngr.reached_preemption(int(step))

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()


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
        f"workdir {workdir!r} has {free / 2**30:.2f} GiB free but a checkpoint needs about "
        f"{min_free_bytes / 2**30:.2f} GiB; free some space or pick another --workdir.")
