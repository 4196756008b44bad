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


def _ours(keypath: Any) -> tuple[str, ...]:
  """Orbax key path (possibly '/'-joined keys) -> prefjax param path (no `transformer`)."""
  parts = [p for k in keypath for p in str(k.key).split("/")]
  return tuple(parts[1:] if parts and parts[0] == "transformer" else parts)


def _lookup(tree: Any, path: tuple[str, ...]) -> Any:
  for key in path:
    if not isinstance(tree, dict) or key not in tree:
      return None
    tree = tree[key]
  return tree


def load_flax_gemma_checkpoint(path: str | os.PathLike, cfg_name: str, *,
                               mesh: Mesh | None = None, rules: Any = None,
                               **config_overrides: Any) -> tuple[ModelConfig, api.Params]:
  """Restores an official Flax Gemma checkpoint dir for preset `cfg_name` -> (cfg, params).

  Every leaf is checked against the preset's shapes first (ValueError naming the missing or
  mis-shaped param). With `mesh`, Orbax restores each param straight into its target sharding
  and cfg.param_dtype (`ArrayRestoreArgs`); without, into host numpy, then onto the device.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  cfg = get_config(cfg_name, **config_overrides)
  flat_cfg = cfg.replace(scan_layers=False)
  path = os.path.abspath(os.fspath(path))
  ckptr = ocp.PyTreeCheckpointer()
  meta = ckptr.metadata(path)
  meta = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
  abstract = api.abstract_params(flat_cfg)
  shapes = {_ours(mkp): tuple(m.shape) for mkp, m in jax.tree_util.tree_flatten_with_path(meta)[0]}
  for kp, spec in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    key = tuple(k.key for k in kp)
    if key not in shapes:
      raise ValueError(f"param {'/'.join(key)} is missing from the checkpoint {path}")
    if shapes[key] != tuple(spec.shape):
      raise ValueError(f"param {'/'.join(key)} in {path} has shape {shapes[key]}, preset "
                       f"{cfg_name!r} expects {tuple(spec.shape)}")
  shardings = api.param_shardings(flat_cfg, mesh, rules) if mesh is not None else None

  def restore_args(mkp, _):
    target = _lookup(shardings, _ours(mkp))
    if target is None:
      return ocp.RestoreArgs(restore_type=np.ndarray)
    return ocp.ArrayRestoreArgs(sharding=target, dtype=cfg.jnp_param_dtype)

  restored = ckptr.restore(path, restore_args=jax.tree_util.tree_map_with_path(restore_args, meta))
  tree = nest_params(dict(restored))
  params = jax.tree_util.tree_map_with_path(
      lambda kp, spec: _lookup(tree, tuple(k.key for k in kp)), abstract)
  if mesh is None:
    params = jax.device_put(jax.tree.map(lambda x, s: np.asarray(x).astype(s.dtype), params,
                                         abstract))
  if cfg.scan_layers:
    params = api.stack_layers(cfg, params)
    if mesh is not None:
      params = jax.device_put(params, api.param_shardings(cfg, mesh, rules))
  return cfg, params
