"""Official Flax Gemma checkpoint layout (Orbax, flat `transformer/...` keys) -> prefjax."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from prefjax import models, sharding
from prefjax.models.flax_checkpoint import flatten_for_release, nest_params

ocp = pytest.importorskip("orbax.checkpoint")


def test_load_release_layout(tmp_path):
  cfg = models.get_config("tiny_gemma")
  params = models.init_params(cfg, 3)
  release = flatten_for_release(params)
  assert set(release["transformer/layer_0/mlp"]) == {"gating_einsum", "linear"}
  assert set(release["transformer/layer_1/attn/q_einsum"]) == {"w"}
  ocp.PyTreeCheckpointer().save(tmp_path / "ckpt", release)
  lcfg, loaded = models.load_flax_gemma_checkpoint(tmp_path / "ckpt", "tiny_gemma")
  assert lcfg == cfg
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  # scan_layers stacks the restored layers.
  scfg, stacked = models.load_flax_gemma_checkpoint(tmp_path / "ckpt", "tiny_gemma",
                                                    scan_layers=True)
  assert stacked["layers"]["attn"]["q_einsum"]["w"].shape == (2, 4, 32, 8)
  # Restored straight into the target shardings on a (2, 2, 2) mesh.
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  _, placed = models.load_flax_gemma_checkpoint(tmp_path / "ckpt", "tiny_gemma", mesh=mesh)
  jax.tree.map(lambda x, s: np.testing.assert_equal(x.sharding == s, True), placed,
               models.param_shardings(cfg, mesh))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               placed, params)
  with pytest.raises(ValueError, match=r"layer_0/attn/qkv_einsum/w is missing"):
    models.load_flax_gemma_checkpoint(tmp_path / "ckpt", "tiny_gemma_mha")


def test_nest_params_handles_nested_and_flat():
  flat = {"transformer/embedder": {"input_embedding": 1}, "transformer/layer_0/mlp": {"linear": 2}}
  nested = {"transformer": {"embedder": {"input_embedding": 1}, "layer_0": {"mlp": {"linear": 2}}}}
  assert nest_params(flat) == nest_params(nested) == nested["transformer"]
