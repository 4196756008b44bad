"""One process of the 2-process x 4-device CPU job in test_multiprocess.py.

usage: python -m tests.train.mp_worker PROCESS_ID NUM_PROCESSES PORT OUT_JSON
Each process feeds its half of the same global batches; prints the losses as JSON.
"""
import json
import sys

import jax


def main(argv):
  pid, nproc, port, out = int(argv[1]), int(argv[2]), int(argv[3]), argv[4]
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc,
                             process_id=pid, initialization_timeout=120)
  jax.config.update("jax_threefry_partitionable", True)
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from prefjax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from tests.train import helpers  # pylint: disable=g-import-not-at-top
  mesh = sharding_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rows = 8 // nproc
  losses = []
  with jax.set_mesh(mesh), nn.logical_axis_rules(list(sharding_lib.LOGICAL_AXIS_RULES)):
    state, fn = helpers.setup(mesh)
    for s in range(2):
      full = helpers.pair_batch(8, seed=s)
      local = {k: v[pid * rows:(pid + 1) * rows] for k, v in full.items()}
      state, m = fn(state, sharding_lib.make_global_batch(local, mesh))
      losses.append(float(jax.device_get(m["loss"])))
  with open(out, "w", encoding="utf-8") as f:
    json.dump({"losses": losses, "process_count": jax.process_count(),
               "devices": jax.device_count()}, f)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(sys.argv)
