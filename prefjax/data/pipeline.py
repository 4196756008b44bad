"""`make_pipeline`: records -> validated index -> grain MapDataset (shard, shuffle, epochs)
-> featurize (template, tokenize, truncate) -> layout (batch or pack+batch) -> workers.

The returned `Pipeline` is a grain `DatasetIterator`: `next()` gives numpy dict batches of the
LOCAL batch, `get_state()/set_state()` resume exactly, and it can be saved with
`grain.checkpoint.CheckpointSave(pipeline)` / restored with `CheckpointRestore(pipeline)`.
"""
from __future__ import annotations

import dataclasses
import functools
import threading
from typing import Any, Mapping

import grain
import numpy as np

from prefjax.data import config as config_lib
from prefjax.data import formats, layouts, packing
from prefjax.data.errors import DataError, DropStats
from prefjax.data.index import Index, build_index
from prefjax.data.templates import Template, get_template
from prefjax.data.tokenize import Limits, encode, truncate
from prefjax.data.tokenizer import Tokenizer, load_tokenizer

KINDS = ("pairs", "unpaired", "sft", "rankings")


@dataclasses.dataclass(frozen=True)
class Settings:
  """The `data.*` keys as read once from the config."""
  fmt: str
  kind: str
  layout: str
  limits: Limits
  max_responses: int
  max_pairs_per_row: int
  packing_bins: int
  policy: str
  template: Template
  max_consecutive_drops: int = 10_000

  @classmethod
  def from_config(cls, cfg: Any) -> "Settings":
    g = functools.partial(config_lib.get, cfg)
    kind, layout = g("kind"), g("layout")
    if kind not in KINDS:
      raise ValueError(f"unknown data.kind {kind!r}; known: {', '.join(KINDS)}")
    if layout != "padded" and kind != "pairs":
      raise ValueError(f"data.layout={layout!r} needs data.kind='pairs', got {kind!r}")
    limits = Limits(int(g("max_len")), int(g("max_prompt_len")), int(g("max_response_len")),
                    layout)
    limits.validate(2 if kind == "pairs" else 1)
    return cls(g("format"), kind, layout, limits, int(g("max_responses")),
               int(g("max_pairs_per_row")), int(g("packing_bins")), g("on_bad_record"),
               get_template(g("chat_template")),
               int(10_000 if g("max_consecutive_drops") is None else g("max_consecutive_drops")))


class Featurizer:
  """Map transform: item (record index, sub item) -> element dict, or None when dropped.

  A train split whose records stop yielding anything usable would otherwise be filtered
  forever: after `stop_after` dropped items in a row (`data.max_consecutive_drops`, or one
  whole pass of this process's items when that is fewer) it raises `DataError` with the
  per-reason counts. It raises inside a grain worker process too; grain re-raises it here.
  """

  def __init__(self, source: Any, settings: Settings, tokenizer: Tokenizer, *,
               keep_blanks: bool = False, split: str = "train", stop_after: int = 0):
    self.source, self.s, self.tok = source, settings, tokenizer
    # Eval keeps a masked blank in place of a dropped item (grain skips None elements).
    self.blank = layouts.BLANK if keep_blanks else None
    self.dropped = DropStats()
    self.split, self.stop_after = split, int(stop_after)
    self._in_a_row = 0
    self._guard = threading.Lock()

  def _drop(self, reason: str, where: str) -> None:
    with self._guard:
      self.dropped.add(reason, where)
      self._in_a_row += 1
      if self.stop_after and self._in_a_row >= self.stop_after:
        counts = ", ".join(f"{r}={n}" for r, n in sorted(self.dropped.counts.items()))
        first = "; ".join(f"{r} first at {locs[0]}"
                          for r, locs in sorted(self.dropped.examples.items()) if locs)
        raise DataError(
            "no_usable_records",
            f"no usable record in the last {self._in_a_row} records "
            f"(dropped: {counts}; {first}); the records do not fit data.max_len="
            f"{self.s.limits.max_len} / max_prompt_len={self.s.limits.max_prompt_len} / "
            f"max_response_len={self.s.limits.max_response_len}: raise them or fix the data",
            path=f"data {self.split}")

  def _kept(self) -> None:
    self._in_a_row = 0

  def __getstate__(self):  # grain workers receive a pickled copy
    state = dict(self.__dict__)
    del state["_guard"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._guard = threading.Lock()

  def example(self, item: Any) -> formats.Example:
    ex = formats.parse(self.source[int(item[0])], self.s.fmt)
    ex = formats.to_kind(ex, self.s.kind, int(item[1]))
    if ex.kind == "rankings":
      order = sorted(range(len(ex.responses)), key=lambda k: -ex.scores[k])[:self.s.max_responses]
      ex = dataclasses.replace(ex, responses=tuple(ex.responses[k] for k in order),
                               scores=tuple(ex.scores[k] for k in order))
    return ex

  def __call__(self, item: Any) -> dict | None:
    if int(item[0]) < 0:  # eval padding
      return self.blank
    ex = self.example(item)
    t = truncate(encode(ex, self.tok, self.s.template, self.s.limits), self.s.limits,
                 keep_bos=self.tok.add_bos)
    if ex.kind == "pairs" and t.responses[0] == t.responses[1]:
      path, loc = self.source.where(int(item[0]))
      self._drop("identical_after_truncation", f"{path} {loc}")
      return self.blank
    self._kept()
    if self.s.layout == "packed":
      return packing.packed_features(t.prompt, t.responses)
    if self.s.layout == "prompt_shared":
      return packing.prompt_shared_features(t.prompt, t.responses)
    return {"prompt": np.asarray(t.prompt, np.int32),
            "responses": [np.asarray(r, np.int32) for r in t.responses],
            "label": ex.label, "scores": ex.scores, "margin": ex.margin,
            "truncated": t.truncated}


def _not_none(x: Any) -> bool:
  return x is not None and not layouts.is_blank(x)


@dataclasses.dataclass
class PipelineInfo:
  split: str
  paths: Any
  num_records: int
  num_items: int            # usable items in this split (all processes)
  local_items: int          # items this process reads per epoch
  local_batch_size: int
  has_margin: bool
  stats: DropStats          # validation-pass drops (all processes agree)


class Pipeline(grain.DatasetIterator):
  """Checkpointable iterator over local numpy batches (a grain `DatasetIterator`)."""

  def __init__(self, parent: grain.DatasetIterator, info: PipelineInfo, featurizer: Featurizer):
    super().__init__(parent)
    self.info, self._featurizer = info, featurizer

  def __next__(self) -> dict:
    return next(self._parent)

  def get_state(self) -> dict:
    return self._parent.get_state()

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state)

  def close(self) -> None:
    if hasattr(self._parent, "close"):
      self._parent.close()

  @property
  def dropped(self) -> DropStats:
    """Validation drops plus drops after truncation seen in THIS process (0 workers)."""
    out = DropStats()
    out.merge(self.info.stats)
    out.merge(self._featurizer.dropped)
    return out


def _shard(items: np.ndarray, process_index: int, process_count: int, pad: bool) -> np.ndarray:
  """Strided per-process shard; equal length on every process (dropped or padded with -1)."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  per = -(-len(items) // process_count) if pad else len(items) // process_count
  if per == 0:
    raise ValueError(f"{len(items)} usable items cannot be split over {process_count} processes")
  shard = items[process_index::process_count][:per]
  if len(shard) < per:
    shard = np.concatenate([shard, np.full((per - len(shard), 2), -1, np.int64)])
  return shard


def _local_batch(global_batch: int, process_count: int) -> int:
  if global_batch < 1 or global_batch % process_count:
    raise ValueError(f"data.batch_size={global_batch} must be a positive multiple of the "
                     f"process count {process_count}")
  return global_batch // process_count


def _apply_layout(ds: grain.IterDataset, s: Settings, batch: int, has_margin: bool, pad_id: int,
                  *, seed: int, train: bool) -> grain.IterDataset:
  if s.layout in ("packed", "prompt_shared"):
    ds = ds.filter(_not_none)
    bins = s.packing_bins or 4 * batch
    ds = packing.pack(ds, length=s.limits.max_len, num_bins=bins,
                      max_pairs_per_row=s.max_pairs_per_row, seed=seed, shuffle_bins=train)
    fn = functools.partial(packing.collate_rows, num_rows=batch,
                           max_pairs_per_row=s.max_pairs_per_row,
                           shared=s.layout == "prompt_shared")
    return ds.batch(batch, drop_remainder=train, batch_fn=fn)
  if train:
    ds = ds.filter(_not_none)
  fn = _collate_fn(s, batch, has_margin, pad_id, train)
  return ds.batch(batch, drop_remainder=train, batch_fn=fn)


def _collate_fn(s: Settings, batch: int, has_margin: bool, pad_id: int, train: bool) -> Any:
  """The batch function of the padded layouts for `s.kind` (elements -> numpy batch)."""
  common = dict(batch=batch, length=s.limits.max_len, pad_id=pad_id, eval_mask=not train)
  return {
      "pairs": functools.partial(layouts.collate_pairs, has_margin=has_margin, **common),
      "sft": functools.partial(layouts.collate_sft, **common),
      "unpaired": functools.partial(layouts.collate_unpaired, **common),
      "rankings": functools.partial(layouts.collate_rankings, num_responses=s.max_responses,
                                    has_margin=has_margin, **common),
  }[s.kind]


def batch_shapes(data_config: Any, *, split: str = "train", process_count: int = 1,
                 has_margin: bool = False) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """`{key: (shape, dtype)}` of one GLOBAL batch of `split` as `make_pipeline` yields it
  (its local batches stacked over `process_count` processes), without reading any data.

  Built by collating an empty batch with the same functions the pipeline uses, so the two
  cannot drift apart. Used to compile the train step ahead of time (`prefjax.aot`).

  Raises:
    ValueError: the layout / kind / sizes are invalid, or the global batch is not a
      multiple of `process_count` (as `make_pipeline` would on that many hosts).
  """
  s = Settings.from_config(data_config)
  g = functools.partial(config_lib.get, data_config)
  train = split == "train"
  global_batch = int(g("batch_size") if train else (g("eval_batch_size") or g("batch_size")))
  local = _local_batch(global_batch, process_count)
  if s.layout in ("packed", "prompt_shared"):
    out = packing.collate_rows([], num_rows=local, max_pairs_per_row=s.max_pairs_per_row,
                               shared=s.layout == "prompt_shared", length=s.limits.max_len)
  else:
    out = _collate_fn(s, local, has_margin, 0, train)([])
  return {k: ((v.shape[0] * process_count,) + v.shape[1:], v.dtype) for k, v in out.items()}


def _as_tokenizer(tokenizer: Tokenizer | str | None, cfg: Any) -> Tokenizer:
  if isinstance(tokenizer, Tokenizer):
    return tokenizer
  return load_tokenizer(tokenizer or config_lib.get(cfg, "tokenizer"))


def _index_for(cfg: Any, s: Settings, split: str) -> tuple[Index, Any]:
  fraction = config_lib.get(cfg, "split_fraction")
  if split == "train":
    spec = config_lib.get(cfg, "train")
    return build_index(spec, fmt=s.fmt, kind=s.kind, policy=s.policy, part="train",
                       fraction=fraction), spec
  evals = config_lib.get(cfg, "eval")
  if evals is None:
    if fraction is None or fraction >= 1.0:
      raise ValueError("no data.eval given and no data.split_fraction < 1 to hold out from train")
    spec = config_lib.get(cfg, "train")
    return build_index(spec, fmt=s.fmt, kind=s.kind, policy=s.policy, part="eval",
                       fraction=fraction), spec
  if isinstance(evals, Mapping) or hasattr(evals, "items"):
    evals = dict(evals)
    if split not in evals:
      if split != "eval" or len(evals) != 1:
        raise ValueError(f"unknown eval split {split!r}; data.eval has {sorted(evals)}")
      split = next(iter(evals))
    spec = evals[split]
  else:
    spec = evals
  return build_index(spec, fmt=s.fmt, kind=s.kind, policy=s.policy), spec


def eval_names(data_config: Any) -> list[str]:
  """Names accepted by `make_pipeline(split=...)` for evaluation."""
  evals = config_lib.get(data_config, "eval")
  if isinstance(evals, Mapping) or hasattr(evals, "items"):
    return list(dict(evals))
  return ["eval"]


def make_pipeline(data_config: Any, tokenizer: Tokenizer | str | None = None, *,
                  split: str = "train", process_index: int = 0, process_count: int = 1,
                  seed: int = 0) -> Pipeline:
  """Builds the input pipeline for `split` ("train", or an eval name: see `eval_names`).

  train: seeded shuffle (a new order per epoch), `num_epochs` (None = forever), drops the
    last partial batch. eval: one pass in order, the last batch padded, with `example_mask`
    [B] (padded layouts) or `pair_mask` (packed layouts) marking real examples.
  Each process reads only its strided shard of the usable items; batches are LOCAL
  (`batch_size // process_count`).
  """
  s = Settings.from_config(data_config)
  tok = _as_tokenizer(tokenizer, data_config)
  train = split == "train"
  index, spec = _index_for(data_config, s, split)
  index.stats.log(split)
  g = functools.partial(config_lib.get, data_config)
  global_batch = int(g("batch_size") if train else (g("eval_batch_size") or g("batch_size")))
  batch = _local_batch(global_batch, process_count)
  items = _shard(index.items, process_index, process_count, pad=not train)
  featurizer = Featurizer(index.source, s, tok, keep_blanks=not train, split=split,
                          stop_after=(min(s.max_consecutive_drops, len(items))
                                      if train and s.max_consecutive_drops > 0 else 0))
  ds = grain.MapDataset.source(items)
  if train:
    if g("shuffle"):
      ds = ds.shuffle(seed=seed)
    epochs = g("num_epochs")
    ds = ds.repeat(None if epochs is None else int(epochs))
  read = grain.ReadOptions(num_threads=int(g("read_threads")),
                           prefetch_buffer_size=int(g("prefetch_buffer_size")))
  ds = ds.map(featurizer).to_iter_dataset(read)
  ds = _apply_layout(ds, s, batch, index.has_margin, tok.pad_id, seed=seed, train=train)
  workers = int(g("worker_count") or 0) if train else 0
  if workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  info = PipelineInfo(split, spec, index.num_records, len(index.items), len(items), batch,
                      index.has_margin, index.stats)
  return Pipeline(iter(ds), info, featurizer)
