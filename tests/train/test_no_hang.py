"""No hangs: a split that yields nothing usable stops with the drop counts, and a signal stops
a run that is blocked waiting for data."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.train import loop_helpers as lh


def _unusable(path, n=40):
  """Pairs whose responses differ only after 30 shared words: identical once truncated."""
  with open(path, "w", encoding="utf-8") as f:
    for i in range(n):
      f.write(json.dumps({"prompt": f"question {i}", "chosen": "same " * 30 + "x",
                          "rejected": "same " * 30 + "y"}) + "\n")
  return str(path)


@pytest.mark.parametrize("workers", [0, 2])
def test_split_with_no_usable_record_stops_with_the_counts(tmp_path, workers):
  data = _unusable(tmp_path / "pairs.jsonl")
  t0 = time.time()
  r = lh.run_main(str(tmp_path / "run"), lh.overrides(data, **{"data.worker_count": workers}),
                  timeout=120)
  assert r.returncode == 2, r.stderr[-3000:]
  assert "error: data train: no usable record in the last" in r.stderr
  assert "identical_after_truncation=" in r.stderr and "pairs.jsonl line" in r.stderr
  assert "Traceback" not in r.stderr and time.time() - t0 < 90


def test_sigterm_while_waiting_for_data_stops_within_seconds(tmp_path):
  data = _unusable(tmp_path / "pairs.jsonl", n=400)
  run = tmp_path / "run"
  env = dict(os.environ, PYTHONPATH=str(lh.REPO), JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "prefjax.main", "--config=configs/quickstart.py:runlocal",
         f"--workdir={run}", *lh.overrides(data, **{"data.max_consecutive_drops": 0})]
  proc = subprocess.Popen(cmd, cwd=str(lh.REPO), env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 120
    events = lambda: list(run.glob("tensorboard/events*"))  # noqa: E731
    while time.time() < deadline and not events():
      time.sleep(0.2)
    assert events(), "the run never reached its loop"
    time.sleep(3.0)  # blocked in the pipeline: every record is dropped, forever
    proc.send_signal(signal.SIGTERM)
    t0 = time.time()
    _, err = proc.communicate(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert time.time() - t0 < 30
  assert proc.returncode == 143, err[-3000:]
  assert "stopped by SIGTERM at step 0, while waiting for data" in err
  assert "Traceback" not in err


def test_drops_are_counted_in_metrics_by_reason(tmp_path):
  data = lh.write_pairs(tmp_path / "pairs.jsonl")
  with open(data, "a", encoding="utf-8") as f:
    f.write(json.dumps({"prompt": "q", "chosen": "", "rejected": "b"}) + "\n")
  _unusable(tmp_path / "bad.jsonl", n=5)
  with open(data, "a", encoding="utf-8") as f:
    f.write((tmp_path / "bad.jsonl").read_text())
  r = lh.run_main(str(tmp_path / "run"), lh.overrides(
      data, total_steps=4, **{"data.on_bad_record": "skip", "eval.every_steps": 0}))
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  last = [row for row in rows if "loss" in row][-1]
  assert last["data/dropped/empty_response"] == 1.0
  assert last["data/dropped/identical_after_truncation"] >= 1.0
