"""Shared toy setup for the train tests: a tiny model, synthetic batches, one jitted step."""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from prefjax import models
from prefjax import sharding as sharding_lib
from prefjax.train import optimizer as optim_lib
from prefjax.train import state as state_lib
from prefjax.train import step as step_lib
from prefjax.train import tasks as tasks_lib

VOCAB = 64


def model_cfg(task: str = "preference"):
  return models.get_config("tiny_gemma", vocab_size=VOCAB,
                           num_reward_heads=1 if task == "reward" else 0)


def optim_config(lr: float = 1e-2, accum: int = 1) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      learning_rate=lr, schedule="constant", warmup_steps=0, weight_decay=0.01, grad_clip=1.0,
      grad_accum_steps=accum, min_lr_ratio=0.0))


def pair_batch(b: int = 8, length: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
  """Padded pairs [B, 2, L]: a 4-token prompt then a response of random length."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, VOCAB, size=(b, 2, length)).astype(np.int32)
  seg = np.zeros((b, 2, length), np.int32)
  mask = np.zeros((b, 2, length), np.float32)
  for i in range(b):
    for j in range(2):
      n = int(rng.integers(8, length + 1))
      seg[i, j, :n] = 1
      mask[i, j, 3:n - 1] = 1  # targets of response tokens
  tokens = tokens * seg
  targets = np.concatenate([tokens[..., 1:], np.zeros((b, 2, 1), np.int32)], -1)
  pos = np.broadcast_to(np.arange(length, dtype=np.int32), (b, 2, length)).copy() * seg
  return {"tokens": tokens, "targets": targets, "loss_mask": mask, "positions": pos,
          "segment_ids": seg}


def setup(mesh, *, task: str = "preference", loss_name: str = "dpo", ref_mode: str = "model",
          accum: int = 1, lr: float = 1e-2, seed: int = 0,
          kernels: models.Kernels | None = None, cpu_scheduler: str | None = None):
  """Returns `(state, step_fn)` for a tiny model on `mesh` (call inside the mesh context).

  `kernels`: None = the mesh platform's defaults; `cpu_scheduler` replaces theirs."""
  cfg = model_cfg(task)
  kernels = kernels or models.Kernels.for_platform(step_lib.mesh_platform(mesh))
  if cpu_scheduler is not None:
    kernels = kernels.replace(cpu_scheduler=cpu_scheduler)
  rules = sharding_lib.LOGICAL_AXIS_RULES
  loss_cfg = ml_collections.ConfigDict({"name": loss_name, "beta": 0.1}
                                       if task == "preference" else {"name": "bradley_terry"})
  task_obj = tasks_lib.make_task(task, model_cfg=cfg, layout="padded", loss_config=loss_cfg,
                                 ref_mode=ref_mode, chunk_size=8, kernels=kernels)
  tx, schedule = optim_lib.make_optimizer(optim_config(lr, accum), 100)
  param_sh = models.param_shardings(cfg, mesh, rules)
  abstract = models.abstract_params(cfg)
  has_ref = ref_mode == "model"
  state_sh = state_lib.state_shardings(tx, abstract, param_sh, mesh, has_ref)
  params = models.init_params(cfg, jax.random.PRNGKey(seed), mesh=mesh, rules=rules)
  ref = jax.jit(lambda p: p, out_shardings=param_sh)(params) if has_ref else None
  state = state_lib.create_state(params, tx, state_sh, ref, seed)
  batch_sh = step_lib.batch_shardings(pair_batch(), mesh)
  fn = step_lib.jit_train_step(task_obj, tx, schedule, state_sh, batch_sh, mesh,
                               accum_steps=accum, kernels=kernels)
  return state, fn


def run_steps(mesh, batches, **kw) -> tuple[list[dict], Any]:
  """Runs one step per batch; returns host metrics and host params."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(list(sharding_lib.LOGICAL_AXIS_RULES)):
    state, fn = setup(mesh, **kw)
    out = []
    for b in batches:
      state, m = fn(state, sharding_lib.make_global_batch(b, mesh))
      out.append({k: float(v) for k, v in jax.device_get(m).items()})
    return out, jax.device_get(state.params)


def mesh_of(n: int, shape: dict | None = None):
  return sharding_lib.make_mesh(shape or {"fsdp": -1}, devices=jax.devices()[:n])
