"""Device mesh and the one logical-axis -> mesh-axis rule table.

Model code names logical axes only (`embed`, `mlp`, `heads`, `vocab`, `batch`, ...);
this module maps them onto the three mesh axes:

  data    pure data parallelism (replicated params; across slices over DCN)
  fsdp    data parallelism with parameters and optimizer state sharded (ZeRO-3)
  tensor  Megatron-style tensor parallelism over heads / MLP / vocabulary

All meshes use `AxisType.Auto` (GSPMD-style propagation with logical constraints),
see TOOLCHAIN.md: JAX 0.10's default `Explicit` axes reject
`with_sharding_constraint` on named axes.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis name -> mesh axis (or axes, or None = replicated). Parameters and
# activations use distinct names where one mesh axis would otherwise appear twice in
# one PartitionSpec (e.g. FSDP shards weights' `embed` and activations' `batch`).
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", None),  # 1 KV head (MQA) cannot be split; override for large GQA models
    ("head_dim", None),
    ("kv", None),
    ("layers", None),
    ("qkv", None),
    ("reward_heads", None),
    # activations
    ("batch", BATCH_AXES),
    ("length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("cache_length", None),
)


def resolve_mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves `{"data": d, "fsdp": f, "tensor": t}` (one entry may be -1) to a shape.

  Raises:
    ValueError: naming the axis when the sizes do not multiply to `num_devices`.
  """
  unknown = set(mesh_config) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"mesh config has unknown axes {sorted(unknown)}; expected {MESH_AXES}")
  sizes = [int(mesh_config.get(name, 1)) for name in MESH_AXES]
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  for name, s in zip(MESH_AXES, sizes):
    if s == 0 or s < -1:
      raise ValueError(f"mesh axis {name!r} has invalid size {s}")
  fixed = math.prod(s for s in sizes if s != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(
          f"mesh {dict(zip(MESH_AXES, sizes))}: {num_devices} devices are not divisible by "
          f"the fixed axes' product {fixed}")
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise ValueError(
        f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but "
        f"{num_devices} are available")
  return tuple(sizes)


def make_mesh(mesh_config: Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None,
              dcn_mesh_config: Mapping[str, int] | None = None) -> Mesh:
  """Builds a `(data, fsdp, tensor)` mesh with Auto axis types.

  Args:
    mesh_config: per-slice axis sizes (ICI); one may be -1. Default: all devices on fsdp.
    devices: devices to use (default `jax.devices()`).
    dcn_mesh_config: optional axis sizes across slices (multi-slice TPU), combined with
      `mesh_utils.create_hybrid_device_mesh`.
  """
  mesh_config = dict(mesh_config or {"fsdp": -1})
  devices = list(devices if devices is not None else jax.devices())
  if dcn_mesh_config:
    from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
    dcn = resolve_mesh_shape(dcn_mesh_config, math.prod(
        int(v) for v in dcn_mesh_config.values() if int(v) > 0) or 1)
    num_slices = math.prod(dcn)
    ici = resolve_mesh_shape(mesh_config, len(devices) // num_slices)
    device_array = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
  else:
    shape = resolve_mesh_shape(mesh_config, len(devices))
    try:
      from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
      device_array = mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError):
      device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def rules_from_config(overrides: Sequence[Sequence[Any]] | None) -> tuple[tuple[str, Any], ...]:
  """Returns the default rule table with `overrides` (list of (logical, mesh)) taking priority."""
  if not overrides:
    return LOGICAL_AXIS_RULES
  over = []
  for item in overrides:
    if len(item) != 2:
      raise ValueError(f"sharding rule {item!r} is not a (logical_axis, mesh_axes) pair")
    name, target = item
    target = tuple(target) if isinstance(target, list) else target
    for t in (target if isinstance(target, tuple) else (target,)):
      if t is not None and t not in MESH_AXES:
        raise ValueError(f"sharding rule {item!r} names unknown mesh axis {t!r}")
    over.append((name, target))
  names = {n for n, _ in over}
  return tuple(over) + tuple(r for r in LOGICAL_AXIS_RULES if r[0] not in names)


def logical_to_sharding(logical_specs: Any, mesh: Mesh,
                        rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> Any:
  """Maps a pytree of logical `PartitionSpec`s (from `nn.get_partition_spec`) to `NamedSharding`s."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, list(rules))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Sharding of a batch array: leading axis over (data, fsdp), the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def num_batch_shards(mesh: Mesh) -> int:
  """How many ways the batch dimension is split (data × fsdp)."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def make_global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's rows into global arrays sharded over (data, fsdp).

  Every process passes its own `local_batch` (leading dim = global batch / process count).
  """
  return {
      k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
      for k, v in local_batch.items()
  }
