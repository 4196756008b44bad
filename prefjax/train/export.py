"""`task=export`: the trained policy / reward model of a workdir as a Hugging Face checkpoint."""
from __future__ import annotations

import os
from typing import Any

import jax

from prefjax import checkpoint as ckpt_lib
from prefjax import models
from prefjax.train import builders


def export(config: Any, workdir: str) -> str:
  """Restores `params` of the latest (or `export.step`) checkpoint and saves them as HF."""
  src = config.export.get("from_workdir") or workdir
  out = config.export.get("output_dir") or os.path.join(workdir, "hf_export")
  trained_task = builders.source_task(
      src, "reward" if config.model.get("num_reward_heads") else "preference")
  mesh, rules = builders.make_mesh(config)
  cfg = builders.model_config(config.model, task=trained_task)
  sh = models.param_shardings(cfg, mesh, rules)
  abstract = jax.tree.map(lambda s, h: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=h),
                          models.abstract_params(cfg), sh)
  ckpt = ckpt_lib.Checkpointer(os.path.join(src, "checkpoints"), async_save=False)
  try:
    step = config.export.get("step")
    params = ckpt.restore_params(None if step is None else int(step), abstract)
  finally:
    ckpt.close()
  save = getattr(models, "save_hf_checkpoint", None)
  if save is None:
    raise ckpt_lib.CheckpointError("this build of prefjax.models has no save_hf_checkpoint")
  if jax.process_index() == 0:
    save(cfg, jax.device_get(params), out)
  return out
