"""A 2-process x 4-device CPU job (jax.distributed on 127.0.0.1, gloo) == one process."""
import json
import os
import socket
import subprocess
import sys

import numpy as np

from tests.train import helpers
from tests.train.loop_helpers import REPO


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  procs = [subprocess.Popen(
      [sys.executable, "-m", "tests.train.mp_worker", str(i), "2", str(port),
       str(tmp_path / f"out{i}.json")], cwd=str(REPO), env=env,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  try:
    outs = [p.communicate(timeout=420)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, o in zip(procs, outs):
    assert p.returncode == 0, o[-3000:]
  res = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]
  assert res[0]["process_count"] == 2 and res[0]["devices"] == 8
  assert res[0]["losses"] == res[1]["losses"]
  batches = [helpers.pair_batch(8, seed=s) for s in range(2)]
  single, _ = helpers.run_steps(helpers.mesh_of(8, {"data": 2, "fsdp": 2, "tensor": 2}),
                                batches)
  np.testing.assert_allclose(res[0]["losses"], [m["loss"] for m in single], rtol=1e-5)
