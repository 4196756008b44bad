"""Random-access record sources over JSONL(.gz), JSON arrays, Parquet, ArrayRecord and TFDS.

Every file source has `__len__`, `read(i) -> dict` (raising `BadRecord` for a malformed record)
and `location(i)` ("line 12", "row 3"). `RecordSource` concatenates them and is a grain
`RandomAccessDataSource` (thread-safe: JSONL is read with `os.pread` over an offset index;
picklable: file handles are opened lazily), so shuffling and resuming are exact.
"""
from __future__ import annotations

import bisect
import gzip
import json
import os
import zlib
from typing import Any, Sequence

from etils import epath
import numpy as np

from prefjax.data.errors import BadRecord, DataError

_GLOB_CHARS = "*?["


def expand_paths(spec: str | Sequence[str]) -> list[str]:
  """Expands a path, a glob or a list of them (local or `gs://`) into sorted file paths."""
  specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
  if not specs:
    raise DataError("missing_path", "no data path given")
  out: list[str] = []
  for s in specs:
    s = os.fspath(s)
    if s.startswith("tfds:"):
      out.append(s)
      continue
    if any(c in s for c in _GLOB_CHARS):
      parts = s.split("/")
      first = next(i for i, p in enumerate(parts) if any(c in p for c in _GLOB_CHARS))
      root = "/".join(parts[:first]) or ("/" if s.startswith("/") else ".")
      matches = sorted(str(p) for p in epath.Path(root).glob("/".join(parts[first:])))
      if not matches:
        raise DataError("missing_path", f"glob matched no files: {s}", path=s)
      out.extend(matches)
    else:
      p = epath.Path(s)
      if not p.exists():
        raise DataError("missing_path", "file does not exist", path=s)
      out.extend(_hf_dir_files(p) if p.is_dir() else [s])
  return out


def _hf_dir_files(p: epath.Path) -> list[str]:
  """The Arrow shards of a Hugging Face `Dataset.save_to_disk` folder, in order."""
  if (p / "dataset_dict.json").exists():
    raise DataError("missing_path", "a saved DatasetDict: give one split folder (e.g. DIR/train)",
                    path=str(p))
  if not (p / "state.json").exists():
    raise DataError("missing_path", "is a directory (give a file, a glob or a Hugging Face "
                    "save_to_disk folder)", path=str(p))
  state = json.loads((p / "state.json").read_text())
  return [str(p / f["filename"]) for f in state.get("_data_files", [])]


_BOM = b"\xef\xbb\xbf"  # a UTF-8 byte order mark, accepted at the start of a text file


def _decode_json(raw: bytes) -> dict:
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise BadRecord("invalid_utf8", f"invalid UTF-8 at byte {e.start}") from None
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    raise BadRecord("invalid_json", f"invalid JSON: {e.msg} (column {e.colno})") from None
  if not isinstance(value, dict):
    raise BadRecord("not_object", f"expected a JSON object, got {type(value).__name__}")
  return value


def _read_bytes(path: str) -> bytes:
  data = epath.Path(path).read_bytes()
  if path.endswith(".gz"):
    try:
      data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
      raise DataError("corrupt_file", f"corrupt gzip: {e}", path=path) from None
  return data


class JsonlFile:
  """JSONL (optionally gzipped): an offset index built once; blank lines are not records."""

  def __init__(self, path: str):
    self.path = path
    data = _read_bytes(path)
    ends = np.flatnonzero(np.frombuffer(data, np.uint8) == 10)
    starts = np.concatenate([[0], ends + 1])
    ends = np.concatenate([ends, [len(data)]])
    if data.startswith(_BOM):
      starts[0] = len(_BOM)  # byte offsets stay file offsets: the record starts after the BOM
    keep = [i for i in range(len(starts)) if data[starts[i]:ends[i]].strip()]
    self._starts, self._ends = starts[keep], ends[keep]
    self._lines = np.asarray(keep, np.int64) + 1
    # Plain local files are read with os.pread; compressed / remote ones stay in memory.
    self._local = not path.endswith(".gz") and "://" not in path
    self._data = None if self._local else data
    self._fd = None

  def __len__(self) -> int:
    return len(self._starts)

  def __getstate__(self):
    return {**self.__dict__, "_fd": None}

  def location(self, i: int) -> str:
    return f"line {int(self._lines[i])}"

  def read(self, i: int) -> dict:
    s, e = int(self._starts[i]), int(self._ends[i])
    if self._local:
      if self._fd is None:
        self._fd = os.open(self.path, os.O_RDONLY)
      raw = os.pread(self._fd, e - s, s)
    else:
      raw = self._data[s:e]
    return _decode_json(raw.rstrip(b"\r"))


class JsonArrayFile:
  """A JSON file holding one array of records (PandaLM, LLMBar)."""

  def __init__(self, path: str, data: bytes):
    self.path = path
    try:
      value = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
      raise DataError("invalid_utf8", f"invalid UTF-8 at byte {e.start}", path=path) from None
    except json.JSONDecodeError as e:
      raise DataError("invalid_json", f"invalid JSON: {e.msg}", path=path,
                      location=f"line {e.lineno}") from None
    if not isinstance(value, list):
      raise DataError("not_object", "expected a JSON array of records", path=path)
    self._records = value

  def __len__(self) -> int:
    return len(self._records)

  def location(self, i: int) -> str:
    return f"record {i + 1}"

  def read(self, i: int) -> dict:
    value = self._records[i]
    if not isinstance(value, dict):
      raise BadRecord("not_object", f"expected a JSON object, got {type(value).__name__}")
    return value


class ParquetFile:
  """Parquet (or Arrow IPC: Hugging Face save_to_disk shards) through pyarrow; rows by index."""

  def __init__(self, path: str):
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    self.path = path
    try:
      with epath.Path(path).open("rb") as f:
        if path.endswith(".arrow"):
          raw = pa.BufferReader(f.read())
          try:
            self._table = pa.ipc.open_stream(raw).read_all()
          except pa.ArrowInvalid:
            raw.seek(0)
            self._table = pa.ipc.open_file(raw).read_all()
        else:
          self._table = pq.read_table(f)
    except Exception as e:  # pyarrow raises several types for corrupt files.
      raise DataError("corrupt_file", f"cannot read {path.rsplit('.', 1)[-1]}: {e}",
                      path=path) from None

  def __len__(self) -> int:
    return self._table.num_rows

  def location(self, i: int) -> str:
    return f"row {i + 1}"

  def read(self, i: int) -> dict:
    return self._table.slice(i, 1).to_pylist()[0]


class ArrayRecordFile:
  """ArrayRecord files whose records are JSON objects (UTF-8 bytes)."""

  def __init__(self, path: str):
    import grain  # pylint: disable=g-import-not-at-top
    self.path = path
    try:
      self._src = grain.sources.ArrayRecordDataSource([path])
    except Exception as e:
      raise DataError("corrupt_file", f"cannot read ArrayRecord: {e}", path=path) from None

  def __len__(self) -> int:
    return len(self._src)

  def location(self, i: int) -> str:
    return f"record {i + 1}"

  def read(self, i: int) -> dict:
    return _decode_json(self._src[i])


class TfdsSource:
  """`tfds:name/config:split` through `tfds.data_source` (needs tensorflow_datasets)."""

  def __init__(self, spec: str):
    try:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise DataError("missing_path", "tensorflow_datasets is not installed", path=spec) from None
    name, _, split = spec[len("tfds:"):].partition(":")
    self.path = spec
    self._src = tfds.data_source(name, split=split or "train")

  def __len__(self) -> int:
    return len(self._src)

  def location(self, i: int) -> str:
    return f"example {i}"

  def read(self, i: int) -> dict:
    rec = self._src[i]
    return {k: v.decode("utf-8") if isinstance(v, bytes) else v for k, v in rec.items()}


def open_file(path: str):
  """Opens one file by its suffix; `.json` may hold an array or JSON lines."""
  if path.startswith("tfds:"):
    return TfdsSource(path)
  name = path[:-3] if path.endswith(".gz") else path
  if name.endswith((".parquet", ".arrow")):
    src = ParquetFile(path)
  elif name.endswith((".array_record", ".arrayrecord")) or ".array_record-" in name:
    src = ArrayRecordFile(path)
  elif name.endswith(".json"):
    data = _read_bytes(path)
    if data.removeprefix(_BOM).lstrip()[:1] == b"[":
      src = JsonArrayFile(path, data)
    else:
      src = JsonlFile(path)
  else:
    src = JsonlFile(path)
  if len(src) == 0:
    raise DataError("empty_file", "file holds no records", path=path)
  return src


class RecordSource:
  """Concatenation of file sources; a grain `RandomAccessDataSource` of raw records."""

  def __init__(self, files: Sequence[Any]):
    self.files = [open_file(f) if isinstance(f, str) else f for f in files]
    self._offsets = np.cumsum([0] + [len(f) for f in self.files]).tolist()

  def __len__(self) -> int:
    return self._offsets[-1]

  def locate(self, index: int) -> tuple[Any, int]:
    k = bisect.bisect_right(self._offsets, index) - 1
    return self.files[k], index - self._offsets[k]

  def where(self, index: int) -> tuple[str, str]:
    f, i = self.locate(index)
    return f.path, f.location(i)

  def __getitem__(self, index: int) -> dict:
    f, i = self.locate(int(index))
    return f.read(i)
