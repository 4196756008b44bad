"""metrics.jsonl + TensorBoard + a tqdm bar, written by process 0 only."""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Optional

import jax
import numpy as np


def _to_float(v: Any) -> Any:
  v = np.asarray(v)
  if v.ndim == 0:
    f = float(v)
    return f if math.isfinite(f) else str(f)
  return v.tolist()


def truncate_jsonl(path: str, last_step: int) -> None:
  """Drops lines logged after `last_step` (a resumed run logs them again)."""
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    lines = f.readlines()
  keep = []
  for line in lines:
    try:
      if int(json.loads(line).get("step", 0)) <= last_step:
        keep.append(line)
    except (ValueError, json.JSONDecodeError):
      continue  # a line cut by a kill
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(keep)


class MetricsWriter:
  """Writes scalar metrics to `workdir/metrics.jsonl` and TensorBoard; shows progress.

  Args:
    workdir: run directory.
    total_steps: for the progress bar / ETA.
    initial_step: the step the run starts (or resumes) from.
    enabled: write anything at all (True on process 0).
    progress: show a tqdm bar.
  """

  def __init__(self, workdir: str, total_steps: int, initial_step: int = 0,
               enabled: Optional[bool] = None, progress: bool = True):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    self._bar = None
    if not self.enabled:
      return
    truncate_jsonl(self.path, initial_step)
    self._file = open(self.path, "a", encoding="utf-8")
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    except ImportError:  # pragma: no cover
      self._tb = None
    if progress:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=total_steps, initial=initial_step, dynamic_ncols=True,
                       desc="train", mininterval=1.0)

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    """Appends one JSON line `{"step": step, **metrics}` and the TensorBoard scalars."""
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _to_float(v) for k, v in metrics.items()}}
    row.setdefault("time", time.time())
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and isinstance(v, float):
          self._tb.add_scalar(k, v, int(step))

  def progress(self, step: int, loss: float, tokens_per_s: float) -> None:
    """Moves the bar to `step` with loss and tokens/s in its postfix (ETA from tqdm)."""
    if self._bar is None:
      return
    self._bar.update(max(0, int(step) - self._bar.n))
    self._bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)

  def flush(self) -> None:
    if self.enabled:
      self._file.flush()
      if self._tb is not None:
        self._tb.flush()

  def close(self) -> None:
    if not self.enabled:
      return
    self._file.close()
    if self._tb is not None:
      self._tb.close()
    if self._bar is not None:
      self._bar.close()


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """Reads every line of a metrics.jsonl file."""
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
