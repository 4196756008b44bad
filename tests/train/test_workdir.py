"""One writer per workdir, and a resume that cannot silently change what the checkpoints hold."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from prefjax import workdir as workdir_lib
from tests.train import loop_helpers as lh


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  return lh.train_toy_run(tmp_path_factory.mktemp("workdir"))


def _copy(trained, tmp_path):
  return lh.copy_run(trained[0], tmp_path)


def _start(workdir, data, **extra):
  env = dict(os.environ, PYTHONPATH=str(lh.REPO), JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "prefjax.main", "--config=configs/quickstart.py:runlocal",
         f"--workdir={workdir}", *lh.overrides(data, **extra)]
  return subprocess.Popen(cmd, cwd=str(lh.REPO), env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def test_second_run_refuses_and_a_killed_runs_lock_is_taken_over(tmp_path):
  data = lh.write_pairs(tmp_path / "pairs.jsonl")
  run = tmp_path / "run"
  first = _start(run, data, total_steps=100000, **{"ckpt.every_steps": 0, "eval.every_steps": 0})
  try:
    lock = run / workdir_lib.LOCK_FILE
    deadline = time.time() + 120
    while time.time() < deadline and not (lock.exists() and lock.read_text()):
      time.sleep(0.2)
    assert lock.exists(), "the first run never took the lock"
    t0 = time.time()
    r = lh.run_main(str(run), lh.overrides(data))
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"workdir {run} is in use by another prefjax run (pid {first.pid}" in r.stderr
    assert "Traceback" not in r.stderr and time.time() - t0 < 60
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait()
  # The kernel released the killed run's lock: the next run takes it over and trains.
  r = lh.run_main(str(run), lh.overrides(data, total_steps=2))
  assert r.returncode == 0, r.stderr[-3000:]
  assert sorted(lh.losses(str(run))) == [1, 2]


@pytest.mark.parametrize("key,value", [("data.batch_size", 16), ("model.embed_dim", 32)])
def test_changed_shape_or_data_key_refuses_and_keeps_config_json(trained, tmp_path, key, value):
  run = _copy(trained, tmp_path)
  before = (run / "config.json").read_text()
  r = lh.run_main(str(run), lh.overrides(trained[1], **{key: value}))
  assert r.returncode == 2, r.stderr[-3000:]
  assert f"{key}: " in r.stderr and f"-> {value}" in r.stderr and "Traceback" not in r.stderr
  assert (run / "config.json").read_text() == before


def test_changed_learning_rate_warns_and_is_recorded(trained, tmp_path):
  run = _copy(trained, tmp_path)
  r = lh.run_main(str(run), lh.overrides(trained[1], total_steps=8,
                                          **{"optim.learning_rate": 5e-4}))
  assert r.returncode == 0, r.stderr[-3000:]
  assert "config.optim.learning_rate changed: 0.001 -> 0.0005" in r.stderr
  old = json.loads((run / "config.6.json").read_text())
  new = json.loads((run / "config.json").read_text())
  assert old["optim"]["learning_rate"] == 1e-3 and new["optim"]["learning_rate"] == 5e-4
  assert sorted(lh.losses(str(run))) == list(range(1, 9))


def test_changed_run_length_is_silent(trained, tmp_path):
  run = _copy(trained, tmp_path)
  r = lh.run_main(str(run), lh.overrides(trained[1], total_steps=7, **{"log.every_steps": 2}))
  assert r.returncode == 0, r.stderr[-3000:]
  assert " changed: " not in r.stderr and not list(run.glob("config.*.json"))


def test_classification():
  c = workdir_lib.classify
  assert c("model.embed_dim") == c("resolved_model.vocab_size") == c("data.batch_size") == "refuse"
  assert c("data.train") == c("loss.name") == c("model.lora.rank") == "refuse"
  assert c("total_steps") == c("eval.every_steps") == c("kernels.attention") == "silent"
  assert c("train.debug_signal_at_step") == c("log.progress") == "silent"
  assert c("optim.learning_rate") == c("loss.beta") == c("mesh.fsdp") == "warn"
  assert c("seed") == "refuse"
  assert c("total_steps", precomputed_reference=True) == "refuse"
  changes = workdir_lib.config_changes({"a": {"b": 1, "c": [1, 2]}}, {"a": {"b": 1, "c": (1, 2),
                                                                          "d": 3}})
  assert changes == {"a.d": (None, 3)}
  with pytest.raises(workdir_lib.WorkdirError, match=r"data.max_len: 64 -> 128"):
    workdir_lib.check_resume({"data": {"max_len": 64}}, {"data": {"max_len": 128}}, 4)


def test_lock_is_reentrant_and_exclusive_across_processes(tmp_path):
  with workdir_lib.lock(str(tmp_path), process_index=0):
    with workdir_lib.lock(str(tmp_path), process_index=0):
      pass
    code = ("from prefjax import workdir as w\n"
            f"with w.lock({str(tmp_path)!r}, process_index=0): pass\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=str(lh.REPO), capture_output=True,
                       text=True, env=dict(os.environ, PYTHONPATH=str(lh.REPO)), check=False)
    assert r.returncode != 0 and "is in use by another prefjax run" in r.stderr
  with workdir_lib.lock(str(tmp_path), process_index=1):  # other processes never lock
    pass
