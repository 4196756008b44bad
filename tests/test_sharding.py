"""Mesh construction and rule table."""
import jax
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from prefjax import sharding


def test_resolve_mesh_shape_fills_free_axis():
  assert sharding.resolve_mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 8) == (2, 2, 2)
  assert sharding.resolve_mesh_shape({"fsdp": -1}, 8) == (1, 8, 1)


@pytest.mark.parametrize("cfg,msg", [
    ({"data": -1, "fsdp": -1}, "at most one"),
    ({"data": 3, "fsdp": -1}, "not divisible"),
    ({"data": 2, "fsdp": 2, "tensor": 1}, "needs 4 devices"),
    ({"model": 2}, "unknown axes"),
])
def test_resolve_mesh_shape_errors(cfg, msg):
  with pytest.raises(ValueError, match=msg):
    sharding.resolve_mesh_shape(cfg, 8)


def test_make_mesh_is_auto_and_8_devices():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  assert mesh.axis_names == sharding.MESH_AXES
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert all(t == AxisType.Auto for t in mesh.axis_types)


def test_logical_rules_map_params_and_batch():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  sh = sharding.logical_to_sharding(
      {"w": P("embed", "mlp"), "x": P("batch", "length", "activation_embed")}, mesh)
  assert sh["w"].spec == P("fsdp", "tensor")
  assert sh["x"].spec == P(("data", "fsdp"), None, None)


def test_rule_overrides_take_priority_and_are_validated():
  rules = dict(sharding.rules_from_config([("kv_heads", "tensor")]))
  assert rules["kv_heads"] == "tensor"
  with pytest.raises(ValueError, match="unknown mesh axis"):
    sharding.rules_from_config([("embed", "model")])


def test_make_global_batch_shards_rows():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  batch = sharding.make_global_batch({"tokens": np.arange(16 * 3).reshape(16, 3)}, mesh)
  assert batch["tokens"].shape == (16, 3)
  assert len(batch["tokens"].addressable_shards) == 8
  np.testing.assert_array_equal(np.asarray(batch["tokens"]), np.arange(48).reshape(16, 3))
