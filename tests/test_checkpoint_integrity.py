"""Verified checkpoints: damaged steps are found by their checksums, moved aside, and the run
resumes from the newest intact step; a failed save stops the run with one line."""
from __future__ import annotations

import os
import pathlib
import resource
import signal
import subprocess
import sys

import numpy as np
import pytest

from prefjax import checkpoint as ckpt_lib
from tests.train import loop_helpers as lh


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A toy run with checkpoints at steps 2, 4 and 6 (copied per test)."""
  return lh.train_toy_run(tmp_path_factory.mktemp("integrity"))


def _copy(trained, tmp_path) -> pathlib.Path:
  return lh.copy_run(trained[0], tmp_path)


def _largest_file(step_dir: pathlib.Path) -> pathlib.Path:
  files = [p for p in step_dir.rglob("*") if p.is_file() and p.parent != step_dir]
  return max(files, key=lambda p: p.stat().st_size)


def _flip(path: pathlib.Path) -> None:
  data = bytearray(path.read_bytes())
  mid = len(data) // 2
  data[mid:mid + 4096] = bytes(b ^ 0xFF for b in data[mid:mid + 4096])
  path.write_bytes(bytes(data))


def _truncate(path: pathlib.Path) -> None:
  with open(path, "r+b") as f:
    f.truncate(path.stat().st_size // 2)


@pytest.mark.parametrize("damage,needle", [
    (_flip, "does not match its checksum"),
    pytest.param(_truncate, "bytes, ", marks=pytest.mark.slow),
    pytest.param(lambda p: p.unlink(), "is missing", marks=pytest.mark.slow),
])
def test_damaged_latest_step_falls_back_to_the_previous_one(trained, tmp_path, damage, needle):
  run = _copy(trained, tmp_path)
  _, data = trained
  victim = _largest_file(run / "checkpoints" / "6")
  damage(victim)
  r = lh.run_main(str(run), lh.overrides(data, total_steps=8))
  assert r.returncode == 0, r.stderr[-3000:]
  assert "checkpoint step 6" in r.stderr and needle in r.stderr
  assert str(victim.relative_to(run / "checkpoints" / "6")) in r.stderr
  # The damaged step is kept aside, never deleted; the run redid steps 5..8 from step 4.
  assert (run / "checkpoints.damaged" / "6").is_dir()
  losses = lh.losses(str(run))
  assert sorted(losses) == list(range(1, 9))
  assert all(np.isfinite(v) for v in losses.values())
  ck = ckpt_lib.Checkpointer(str(run / "checkpoints"), async_save=False)
  try:
    assert ck.latest_intact_step(move_damaged=False) == 8
    assert all(ck.verify(s) is None for s in ck.all_steps())
  finally:
    ck.close()
  params = lh.final_params(str(run))
  assert all(np.all(np.isfinite(v)) for v in params.values())


def test_every_step_damaged_is_one_line(trained, tmp_path):
  run = _copy(trained, tmp_path)
  _, data = trained
  for step in ("2", "4", "6"):
    _flip(_largest_file(run / "checkpoints" / step))
  r = lh.run_main(str(run), lh.overrides(data))
  assert r.returncode == 2, r.stderr[-3000:]
  assert "every checkpoint in" in r.stderr and "Traceback" not in r.stderr
  assert (run / "checkpoints.damaged" / "2").is_dir()


def test_manifest_verification_unit(tmp_path):
  step = tmp_path / "7"
  (step / "state" / "d").mkdir(parents=True)
  (step / "state" / "d" / "a").write_bytes(b"x" * 1000)
  (step / "_CHECKPOINT_METADATA").write_text("{}")  # Orbax's own file: not checksummed
  assert ckpt_lib.verify_step(str(step)) == "unverified"
  ckpt_lib.write_manifest(str(step))
  assert ckpt_lib.verify_step(str(step)) is None
  (step / "_CHECKPOINT_METADATA").write_text('{"changed": 1}')
  assert ckpt_lib.verify_step(str(step)) is None
  (step / "state" / "d" / "a").write_bytes(b"x" * 999 + b"y")
  assert "does not match its checksum" in ckpt_lib.verify_step(str(step))
  (step / "state" / "d" / "a").write_bytes(b"x" * 1000)
  (step / "state" / "extra").write_bytes(b"1")
  assert "was not part of the saved step" in ckpt_lib.verify_step(str(step))
  (step / "state" / "extra").unlink()
  (step / "state" / "d" / "a").write_bytes(b"x" * 500)
  assert "has 500 bytes, 1000 were written" in ckpt_lib.verify_step(str(step))
  (step / "state" / "d" / "a").unlink()
  assert "state/d/a is missing" in ckpt_lib.verify_step(str(step))


def test_free_space_is_reported_in_mib_under_a_gib():
  assert ckpt_lib._size(20 * 2**20) == "20.0 MiB"  # pylint: disable=protected-access
  assert ckpt_lib._size(3 * 2**30) == "3.00 GiB"  # pylint: disable=protected-access


def _limit_file_size():
  """Files over 2 MiB fail with EFBIG (as a full disk fails a write), SIGXFSZ ignored."""
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, 2 << 20))


def test_failed_background_save_stops_the_run_with_one_line(tmp_path):
  data = lh.write_pairs(tmp_path / "pairs.jsonl")
  env = dict(os.environ, PYTHONPATH=str(lh.REPO), JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "prefjax.main", "--config=configs/quickstart.py:runlocal",
         f"--workdir={tmp_path / 'run'}", *lh.overrides(data, total_steps=12)]
  r = subprocess.run(cmd, cwd=str(lh.REPO), env=env, capture_output=True, text=True,
                     timeout=600, preexec_fn=_limit_file_size, check=False)
  assert r.returncode == 2, r.stderr[-3000:]
  err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
  assert len(err) == 1 and "checkpoint save of step 2" in err[0] and "failed" in err[0], err
  assert "MiB free" in err[0] and "Traceback" not in r.stderr
  steps = sorted(lh.losses(str(tmp_path / "run")))
  assert steps and steps[-1] <= 4, steps  # stopped right after the failed save, not at 12
