"""TPU generations: per-chip HBM, peak bf16 FLOP/s and HBM bandwidth, and topology names.

Figures are Google Cloud's published per-chip specifications:
  v4   https://cloud.google.com/tpu/docs/v4   275 TFLOP/s bf16, 32 GiB HBM2, 1200 GB/s
  v5e  https://cloud.google.com/tpu/docs/v5e  197 TFLOP/s bf16, 16 GiB HBM2, 819 GB/s
  v5p  https://cloud.google.com/tpu/docs/v5p  459 TFLOP/s bf16, 95 GiB HBM2e, 2765 GB/s
  v6e  https://cloud.google.com/tpu/docs/v6e  918 TFLOP/s bf16, 32 GiB HBM, 1640 GB/s

v4 and v5p chips have two TensorCores that JAX drives as one device ("megacore"); the
ahead-of-time topologies are built the same way, so one device is one chip everywhere.
"""
from __future__ import annotations

import dataclasses
import math
import re

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU chip generation (one JAX device)."""
  name: str            # v4 | v5e | v5p | v6e
  hbm_bytes: int       # HBM per chip
  peak_flops: float    # dense bf16 FLOP/s per chip
  hbm_bandwidth: float  # bytes/s per chip
  megacore: bool       # two TensorCores driven as one device
  source: str


CHIPS = {
    "v4": Chip("v4", 32 * GiB, 275e12, 1.2e12, True, "https://cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("v5e", 16 * GiB, 197e12, 819e9, False, "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("v5p", 95 * GiB, 459e12, 2.765e12, True, "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("v6e", 32 * GiB, 918e12, 1.64e12, False, "https://cloud.google.com/tpu/docs/v6e"),
}

# Accepted spellings of the generation in a topology name ("v5litepod" as in accelerator types).
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e"}
_TOPOLOGY = re.compile(r"^(v\d+[a-z]*):(\d+(?:x\d+){1,2})$")


@dataclasses.dataclass(frozen=True)
class Topology:
  """A TPU slice named like `v5e:4x4` (chips per dimension), possibly several slices."""
  name: str
  chip: Chip
  dims: tuple[int, ...]
  num_slices: int = 1

  @property
  def chips_per_slice(self) -> int:
    return math.prod(self.dims)

  @property
  def chips(self) -> int:
    return self.chips_per_slice * self.num_slices


def parse_topology(name: str, num_slices: int = 1) -> Topology:
  """`"v5e:4x4"` -> Topology. Raises ValueError naming the accepted forms."""
  m = _TOPOLOGY.match(name.strip())
  gen = m and _ALIASES.get(m.group(1), m.group(1))
  if not m or gen not in CHIPS:
    raise ValueError(f"unknown TPU topology {name!r}; expected GENERATION:AxB[xC] with a "
                     f"generation in {sorted(CHIPS)}, e.g. v5e:4x4, v4:2x2x2, v5p:2x2x1, v6e:2x4")
  if num_slices < 1:
    raise ValueError(f"num_slices={num_slices} must be >= 1")
  dims = tuple(int(d) for d in m.group(2).split("x"))
  return Topology(f"{gen}:{m.group(2)}", CHIPS[gen], dims, num_slices)
