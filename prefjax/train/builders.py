"""Turns the config into the objects the loop needs: process group, mesh, model, params.

Only `run()` (and `main.py`) read the config; these helpers take the pieces they need.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import Mesh

from prefjax import models
from prefjax import sharding as sharding_lib

# `model.*` keys passed to `models.get_config` as overrides when not None.
MODEL_OVERRIDES = ("vocab_size", "embed_dim", "num_layers", "num_heads", "num_kv_heads",
                   "head_dim", "hidden_dim", "dtype", "param_dtype", "remat", "scan_layers",
                   "num_reward_heads", "final_logit_softcap", "sliding_window")
# Model keys that change how a checkpoint runs, not what it is.
RUNTIME_KEYS = ("dtype", "param_dtype", "remat", "scan_layers")


def maybe_initialize_distributed(dist: Any) -> None:
  """`jax.distributed.initialize` for explicit multi-process configs or multi-host TPU.

  `dist.num_processes > 1` (with `coordinator_address`, `process_id`) forms a job of
  several processes (e.g. on 127.0.0.1 for CPU tests, gloo collectives). On a TPU pod
  slice (several TPU workers in the environment) it is called without arguments.
  """
  if jax.distributed.is_initialized():
    return
  num = int(dist.get("num_processes", 1) or 1) if dist is not None else 1
  if num > 1:
    jax.distributed.initialize(
        coordinator_address=dist.coordinator_address, num_processes=num,
        process_id=int(dist.process_id),
        initialization_timeout=int(dist.get("initialization_timeout", 120)))
    return
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if "," in hosts or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    jax.distributed.initialize()


def make_mesh(config: Any, devices: Optional[Any] = None) -> tuple[Mesh, tuple]:
  """The (data, fsdp, tensor) mesh and the logical-axis rules from the config.

  `mesh.*` sizes the axes within a slice (ICI); `dcn_mesh.*`, when its product is above 1,
  across slices (multi-slice over DCN). `devices`: default `jax.devices()` (`prefjax.aot`
  passes a TPU topology's compile-only devices)."""
  dcn = {k: int(v) for k, v in dict(config.get("dcn_mesh") or {}).items()}
  mesh = sharding_lib.make_mesh(dict(config.mesh), devices=devices,
                                dcn_mesh_config=dcn if np.prod(list(dcn.values()) or [1]) > 1
                                else None)
  rules = sharding_lib.rules_from_config(config.get("sharding_rules") or None)
  return mesh, rules


def kernels_from_config(config: Any, platform: str) -> models.Kernels:
  """The run's `models.Kernels`: `platform`'s defaults (`Kernels.for_platform`) with every
  `config.kernels.*` key that is set (None: the platform's default).

  `platform` is that of the devices the program is compiled for (`kernels_for_mesh`), not
  `jax.default_backend()`: an AOT compile for a TPU topology runs on a CPU host.
  """
  section = config.get("kernels") or {}
  overrides = {k: v for k, v in dict(section).items() if v is not None}
  return models.Kernels.for_platform(platform, **overrides)


def kernels_for_mesh(config: Any, mesh: Mesh) -> models.Kernels:
  """`kernels_from_config` for the platform of `mesh`'s devices."""
  return kernels_from_config(config, mesh.devices.flat[0].platform)


def model_config(model: Any, *, task: str, base: Optional[Any] = None) -> Any:
  """`models.ModelConfig` from `model.preset` (or a loaded checkpoint's config) + overrides."""
  overrides = {k: model.get(k) for k in MODEL_OVERRIDES if model.get(k) is not None}
  if task == "reward":
    overrides.setdefault("num_reward_heads", 1)
  elif task in ("preference", "kto", "sft"):
    overrides["num_reward_heads"] = 0
  if base is not None:
    return base.replace(**{k: v for k, v in overrides.items()
                           if k in ("dtype", "param_dtype", "remat", "scan_layers",
                                    "num_reward_heads")})
  return models.get_config(model.preset, **overrides)


def init_kind(path: Optional[str]) -> str:
  """What `model.init` points at: none | hf | workdir | gguf | flax."""
  if not path:
    return "none"
  if path.endswith(".gguf"):
    return "gguf"
  if "://" not in path and os.path.isdir(os.path.join(path, "checkpoints")):
    return "workdir"
  if "://" not in path and os.path.exists(os.path.join(path, "config.json")):
    return "hf"
  return "flax"


def load_pretrained(path: str, model: Any, *, task: str, mesh: Mesh, rules: Any
                    ) -> tuple[Any, Any]:
  """`(cfg, params)` from a Hugging Face dir, a GGUF file, an official Flax Gemma checkpoint or
  a prefjax workdir."""
  kind = init_kind(path)
  if kind == "workdir":
    cfg = saved_model_config(path, model, task=source_task(path, task))
    params, _ = restore_workdir_params(path, cfg, mesh=mesh, rules=rules)
    return adapt_head(cfg, params, task=task, model=model, mesh=mesh, rules=rules)
  runtime = {k: model.get(k) for k in RUNTIME_KEYS if model.get(k) is not None}
  if kind == "hf":
    cfg, params = models.load_hf_checkpoint(path, mesh=mesh, rules=rules, **runtime)
  elif kind == "gguf":
    cfg, params = models.load_gguf_checkpoint(path, mesh=mesh, rules=rules, **runtime)
  else:
    cfg, params = models.load_flax_gemma_checkpoint(path, model.preset, mesh=mesh, rules=rules,
                                                    **runtime)
  return adapt_head(cfg, params, task=task, model=model, mesh=mesh, rules=rules)


def saved_lora(workdir: str) -> Any:
  """The `LoraConfig` a prefjax workdir trained with (None: full fine-tuning)."""
  from prefjax.models import lora as lora_lib  # pylint: disable=g-import-not-at-top
  return lora_lib.config_from(((saved_run_config(workdir) or {}).get("model") or {}).get("lora"))


def restore_workdir_params(workdir: str, cfg: Any, *, mesh: Mesh, rules: Any,
                           step: Optional[int] = None) -> tuple[Any, Any]:
  """The trained model's params of a prefjax workdir (its newest intact checkpoint, or `step`),
  sharded for `mesh`, and the run's LoRA adapters (None for a full fine-tuning run).

  A LoRA run's checkpoint holds the adapters (`params`) and the frozen base (`ref_params`):
  the returned params are the base with the adapters merged.
  """
  from prefjax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from prefjax.models import lora as lora_lib  # pylint: disable=g-import-not-at-top
  sh = models.param_shardings(cfg, mesh, rules)
  abstract = jax.tree.map(lambda s, h: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=h),
                          models.abstract_params(cfg), sh)
  lcfg = saved_lora(workdir)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  try:
    if lcfg is None:
      return ckpt.restore_params(step, abstract), None
    trainable = lora_lib.abstract_trainable(
        cfg, abstract, lcfg, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    got = ckpt.restore_subtrees(step, {"params": trainable, "ref_params": abstract})
  finally:
    ckpt.close()
  merged = jax.jit(lambda b, t: lora_lib.apply(b, t, lcfg, cfg), out_shardings=sh)(
      got["ref_params"], got["params"])
  return merged, (lcfg, got["params"]["lora"])


def saved_run_config(workdir: str) -> Optional[dict]:
  """The config.json a prefjax training run wrote into `workdir` (None if there is none)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def saved_model_config(workdir: str, model: Any, *, task: str) -> Any:
  """The ModelConfig a prefjax workdir was trained with: its config.json `resolved_model`
  (written since 2026-12) with the runtime keys (dtype, remat, ...) of `model`, or, for older
  workdirs, `model`'s own keys."""
  resolved = (saved_run_config(workdir) or {}).get("resolved_model")
  if not resolved:
    return model_config(model, task=task)
  from prefjax.models import config as model_config_lib  # pylint: disable=g-import-not-at-top
  return model_config(model, task=task, base=model_config_lib.config_from_dict(resolved))


def source_task(workdir: str, default: str) -> str:
  """The task a prefjax workdir was trained for (from its config.json)."""
  return (saved_run_config(workdir) or {}).get("task", default)


def adapt_head(cfg: Any, params: Any, *, task: str, model: Any, mesh: Mesh, rules: Any
               ) -> tuple[Any, Any]:
  """A reward model from a policy checkpoint gets a fresh reward head (and vice versa)."""
  if task == "reward" and not cfg.num_reward_heads:
    logging.info("model.init is a language model: adding a fresh reward head")
    return models.reward_model_from_policy(
        cfg, params, jax.random.PRNGKey(0), num_reward_heads=int(model.get(
            "num_reward_heads") or 1), mesh=mesh, rules=rules)
  if task != "reward" and cfg.num_reward_heads:
    from prefjax.train import validation  # pylint: disable=g-import-not-at-top
    raise validation.ConfigError(f"config.model.init holds a reward model; task {task!r} needs a "
                                 "language model (an SFT / base checkpoint)")
  return cfg, params


def init_params(config: Any, model_cfg: Any, mesh: Mesh, rules: Any) -> Any:
  """Random sharded init from `config.seed` (never materialised unsharded)."""
  rng = jax.random.PRNGKey(int(config.seed))
  return models.init_params(model_cfg, rng, mesh=mesh, rules=rules)


def checkpoint_bytes(abstract_params: Any, has_ref: bool) -> int:
  """Bytes of one checkpoint: params + two Adam moments (+ reference params)."""
  n = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
          for x in jax.tree.leaves(abstract_params))
  return n * (4 if has_ref else 3)
