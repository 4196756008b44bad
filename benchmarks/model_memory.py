"""Parameter counts and per-device parameter memory of model presets on a simulated mesh.

No allocation: `jax.eval_shape` gives the shapes, `models.param_shardings` the shardings of the
logical-axis rules (prefjax/sharding.py) on a fake 8-device CPU mesh. Prints one JSON object per
(preset, mesh) line.

  python benchmarks/model_memory.py
  python benchmarks/model_memory.py --presets gemma_7b,gemma2_9b --meshes fsdp=8 fsdp=4,tensor=2
"""
from __future__ import annotations

import argparse
import json
import math
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from prefjax import models, sharding  # noqa: E402

DEFAULT_PRESETS = ("gemma_2b", "gemma_7b", "gemma2_2b", "gemma2_9b", "gemma2_27b", "gemma3_1b",
                   "gemma3_4b", "gemma3_12b", "gemma3_27b", "llama3_8b", "mistral_7b",
                   "bench_46m")
GIB = 2 ** 30


def _shard_bytes(spec: jax.ShapeDtypeStruct, shard: jax.sharding.NamedSharding) -> int:
  """Bytes of the largest shard of one parameter (ceil division for uneven splits)."""
  shape = list(spec.shape)
  for dim, axes in enumerate(shard.spec):
    if axes is None:
      continue
    axes = axes if isinstance(axes, tuple) else (axes,)
    shape[dim] = math.ceil(shape[dim] / math.prod(shard.mesh.shape[a] for a in axes))
  return math.prod(shape) * spec.dtype.itemsize


def measure(preset: str, mesh_cfg: dict[str, int]) -> dict:
  cfg = models.get_config(preset)
  mesh = sharding.make_mesh(mesh_cfg)
  abstract = models.abstract_params(cfg)
  shardings = models.param_shardings(cfg, mesh)
  leaves = jax.tree.leaves(abstract)
  per_device = sum(jax.tree.leaves(jax.tree.map(_shard_bytes, abstract, shardings)))
  total = sum(math.prod(x.shape) * x.dtype.itemsize for x in leaves)
  count = models.count_params(abstract)
  return {
      "preset": preset, "mesh": dict(zip(mesh.axis_names, mesh.devices.shape)),
      "params": count, "params_billions": round(count / 1e9, 3), "param_dtype": cfg.param_dtype,
      "param_gib_total": round(total / GIB, 3),
      "param_gib_per_device": round(per_device / GIB, 3),
      # + two float32 Adam moments with the same shardings.
      "param_plus_adam_gib_per_device": round(3 * per_device / GIB, 3),
  }


def _parse_mesh(text: str) -> dict[str, int]:
  return {k: int(v) for k, v in (item.split("=") for item in text.split(","))}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--presets", default=",".join(DEFAULT_PRESETS))
  parser.add_argument("--meshes", nargs="+", default=["fsdp=8", "fsdp=4,tensor=2"])
  args = parser.parse_args()
  for preset in args.presets.split(","):
    for mesh in args.meshes:
      print(json.dumps(measure(preset, _parse_mesh(mesh))), flush=True)


if __name__ == "__main__":
  main()
