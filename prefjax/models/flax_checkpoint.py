"""Official Flax Gemma checkpoints (Orbax PyTree, as released on Kaggle / google-deepmind/gemma).

The release stores params under `transformer/...`, either nested or with flattened keys such as
`{"transformer/layer_0/attn/q_einsum": {"w": ...}, "transformer/layer_0/mlp":
{"gating_einsum": ..., "linear": ...}}` (gemma `params.py`, `nest_params`). prefjax uses the
same names and shapes, so loading is re-nesting, checking and placing.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from prefjax.models import api
from prefjax.models.config import ModelConfig, get_config


def nest_params(tree: dict[str, Any]) -> dict[str, Any]:
  """Splits '/'-joined keys into nested dicts and drops the `transformer` top level."""
  out: dict[str, Any] = {}
  for key, value in tree.items():
    parts = key.split("/")
    node = out
    for part in parts[:-1]:
      node = node.setdefault(part, {})
    value = nest_params(value) if isinstance(value, dict) else value
    if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
      node[parts[-1]].update(value)
    else:
      node[parts[-1]] = value
  return out.get("transformer", out)


def flatten_for_release(params: dict[str, Any]) -> dict[str, Any]:
  """prefjax params -> the released flat layout `{"transformer/<module path>": {leaf: array}}`."""
  flat: dict[str, Any] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = [p.key for p in path]
    flat.setdefault("/".join(["transformer", *keys[:-1]]), {})[keys[-1]] = np.asarray(leaf)
  return flat


def load_flax_gemma_checkpoint(path: str | os.PathLike, cfg_name: str, *,
                               mesh: Mesh | None = None, rules: Any = None,
                               **config_overrides: Any) -> tuple[ModelConfig, api.Params]:
  """Restores an official Flax Gemma checkpoint dir for preset `cfg_name` -> (cfg, params).

  Restored to host memory (numpy), checked leaf by leaf against the preset's shapes (ValueError
  naming the missing / mis-shaped param), cast to cfg.param_dtype and, with `mesh`, placed
  into the target shardings.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  cfg = get_config(cfg_name, **config_overrides)
  flat_cfg = cfg.replace(scan_layers=False)
  restored = ocp.PyTreeCheckpointer().restore(os.fspath(os.path.abspath(path)))
  tree = nest_params(dict(restored))
  abstract = api.abstract_params(flat_cfg)

  def take(kp, spec):
    keys = [k.key for k in kp]
    node = tree
    for k in keys:
      if not isinstance(node, dict) or k not in node:
        raise ValueError(f"param {'/'.join(keys)} is missing from the checkpoint {path}")
      node = node[k]
    if tuple(node.shape) != tuple(spec.shape):
      raise ValueError(f"param {'/'.join(keys)} in {path} has shape {tuple(node.shape)}, "
                       f"preset {cfg_name!r} expects {tuple(spec.shape)}")
    return np.asarray(node).astype(spec.dtype)

  params = jax.tree_util.tree_map_with_path(take, abstract)
  params = api.stack_layers(cfg, params)
  if mesh is not None:
    return cfg, jax.device_put(params, api.param_shardings(cfg, mesh, rules))
  return cfg, jax.device_put(params)
