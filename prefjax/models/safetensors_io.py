"""Tensor-by-tensor safetensors reading and sharded writing (any dtype, bfloat16 included).

Reading uses `safetensors.safe_open(framework="numpy")`; dtypes numpy lacks (BF16, F8) are read
through a memory map of the file at the offsets in its header (ml_dtypes), so a tensor is only
read when asked for. Writing produces the standard layout that `transformers` loads:
`model.safetensors`, or `model-0000i-of-0000n.safetensors` shards plus
`model.safetensors.index.json` (`{"metadata": {"total_size"}, "weight_map"}`).
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import struct
from collections.abc import Iterable

import ml_dtypes
import numpy as np
from safetensors import safe_open

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"


def _read_header(file: pathlib.Path) -> tuple[dict, int]:
  with open(file, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    return json.loads(f.read(n)), 8 + n


class CheckpointReader:
  """Maps tensor names to files of a Hugging Face checkpoint dir and reads them one at a time."""

  def __init__(self, path: str | os.PathLike):
    self.path = pathlib.Path(path)
    index = self.path / INDEX_NAME
    if index.exists():
      weight_map = json.loads(index.read_text())["weight_map"]
      self.files = {k: self.path / v for k, v in weight_map.items()}
    else:
      shards = sorted(self.path.glob("*.safetensors"))
      if not shards:
        raise ValueError(f"no *.safetensors file in {self.path}")
      self.files = {}
      for shard in shards:
        header, _ = _read_header(shard)
        self.files.update({k: shard for k in header if k != "__metadata__"})
    self._headers: dict[pathlib.Path, tuple[dict, int]] = {}

  def __contains__(self, name: str) -> bool:
    return name in self.files

  def get(self, name: str) -> np.ndarray:
    """Returns tensor `name` as a numpy array (its stored dtype).

    Raises:
      ValueError: naming the tensor and the file (or the checkpoint dir) when it is missing.
    """
    if name not in self.files:
      raise ValueError(f"tensor {name!r} is missing from the checkpoint in {self.path} "
                       f"(files: {sorted({f.name for f in self.files.values()})})")
    file = self.files[name]
    if file not in self._headers:
      if not file.exists():
        raise ValueError(f"tensor {name!r}: file {file} named by {INDEX_NAME} does not exist")
      self._headers[file] = _read_header(file)
    header, start = self._headers[file]
    if name not in header:
      raise ValueError(f"tensor {name!r} is not in file {file} (as the index claims)")
    info = header[name]
    if info["dtype"] not in ("BF16", "F8_E4M3", "F8_E5M2"):
      with safe_open(str(file), framework="numpy") as f:
        return f.get_tensor(name)
    begin, end = info["data_offsets"]
    dtype = np.dtype(_DTYPES[info["dtype"]])
    mm = np.memmap(file, dtype=np.uint8, mode="r", offset=start + begin, shape=(end - begin,))
    return np.asarray(mm).view(dtype).reshape(info["shape"])


def _write_file(file: pathlib.Path, tensors: list[tuple[str, np.ndarray]]) -> None:
  header: dict = {"__metadata__": {"format": "pt"}}
  offset = 0
  for name, a in tensors:
    header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape),
                    "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)
  with open(file, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for _, a in tensors:
      f.write(np.ascontiguousarray(a).tobytes())


def parse_size(size: int | str) -> int:
  """`5GB`, `500MB`, `2GiB` or an int (bytes) -> bytes."""
  if isinstance(size, int):
    return size
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B\s*", size.upper().replace("IB", "iB"))
  if not m:
    raise ValueError(f"cannot parse shard size {size!r}; use e.g. '5GB' or an int")
  base = 1024 if m.group(3) else 1000
  return int(float(m.group(1)) * base ** " KMGT".index(m.group(2) or " "))


def write_sharded(path: str | os.PathLike, tensors: Iterable[tuple[str, np.ndarray]], *,
                  max_shard_size: int | str) -> list[str]:
  """Writes (name, array) pairs into shards of at most `max_shard_size` bytes (a tensor larger
  than that gets its own shard); returns the file names. Holds one shard in memory at a time."""
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  limit = parse_size(max_shard_size)
  tmp_names: list[str] = []
  weight_map: dict[str, str] = {}
  shard: list[tuple[str, np.ndarray]] = []
  size = total = 0

  def flush() -> None:
    name = f"shard-tmp-{len(tmp_names):05d}.safetensors"
    _write_file(path / name, shard)
    weight_map.update({n: name for n, _ in shard})
    tmp_names.append(name)

  for name, a in tensors:
    if shard and size + a.nbytes > limit:
      flush()
      shard, size = [], 0
    shard.append((name, a))
    size += a.nbytes
    total += a.nbytes
  if shard:
    flush()
  n = len(tmp_names)
  final = (["model.safetensors"] if n == 1 else
           [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
  rename = dict(zip(tmp_names, final))
  for old, new in rename.items():
    os.replace(path / old, path / new)
  if n > 1:
    index = {"metadata": {"total_size": total},
             "weight_map": {k: rename[v] for k, v in sorted(weight_map.items())}}
    (path / INDEX_NAME).write_text(json.dumps(index, indent=2))
  return final
