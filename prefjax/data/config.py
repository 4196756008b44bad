"""`default_data_config()`: the `data.*` keys read by `make_pipeline`."""
from __future__ import annotations

from typing import Any, Mapping

import ml_collections

SHIPPED_HH = "prefjax/assets/data/hh_rlhf_helpful_base/test.jsonl.gz"


def shipped_hh_path() -> str:
  import pathlib  # pylint: disable=g-import-not-at-top
  return str(pathlib.Path(__file__).resolve().parents[2] / SHIPPED_HH)


def default_data_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  any_type = lambda v: ml_collections.FieldReference(v, field_type=object)  # noqa: E731
  c.train = any_type(shipped_hh_path())  # path, glob (local or gs://), list of them, or "tfds:name:split"
  c.eval = any_type(None)      # path / glob / list, or dict name -> path; None: held-out split
  c.format = "auto"            # auto | explicit | conversational | hh | unpaired | rankings | sft
                               # | pandalm | llmbar | hhh
  c.kind = "pairs"             # pairs | unpaired | sft | rankings (pairs convert to the others)
  c.layout = "padded"          # padded | packed | prompt_shared (packed ones: pairs only)
  c.batch_size = 8             # GLOBAL batch: pairs/examples (padded) or packed rows (packed)
  c.eval_batch_size = 0        # global eval batch; 0: same as batch_size
  c.max_len = 512              # tokens per sequence (padded) or per packed row
  c.max_prompt_len = 256       # prompt truncated from the left (BOS kept) to this
  c.max_response_len = 256     # each response truncated from the right to this
  c.max_responses = 4          # rankings: K (responses beyond K: the K best scored are kept)
  c.max_pairs_per_row = 8      # packed layouts: S, pairs per row at most (pair_mask [R, S])
  c.packing_bins = 0           # packed layouts: first-fit bins; 0: 4 x rows per batch
  c.shuffle = True             # seeded shuffle, a new order every epoch
  c.num_epochs = None          # None: repeat forever; N: stop after N epochs
  c.worker_count = 0           # grain worker processes (0: threads in this process)
  c.read_threads = 2           # grain reader threads per process (record -> tokens)
  c.prefetch_buffer_size = 64  # featurized elements buffered per process
  c.on_bad_record = "error"    # error: stop at the first malformed record; skip: count and go on
  c.max_consecutive_drops = 10_000  # train: stop (with the drop counts) after this many records
                               # in a row yield nothing usable, or a whole pass of the split
                               # (0: never; a signal still stops a run waiting for data)
  c.chat_template = "hh"       # hh | gemma | llama3 | none
  c.tokenizer = "mistral_v1"   # tokenizer path or name (mistral_v1 ships with the package)
  c.split_fraction = 0.8       # train on this hash-fraction of `train`; eval on the rest when
                               # `eval` is None (None or 1.0: no split)
  c.holdout = None             # alternative spelling: 1 - split_fraction
  return c


def _lookup(cfg: Any, key: str) -> tuple[bool, Any]:
  if isinstance(cfg, Mapping) or hasattr(cfg, "keys"):
    return (key in cfg, cfg[key] if key in cfg else None)
  return (hasattr(cfg, key), getattr(cfg, key, None))


def get(cfg: Mapping[str, Any] | ml_collections.ConfigDict, key: str) -> Any:
  """Reads `key` (missing keys take `default_data_config()`'s value); aliases `task_layout`
  for `layout` and `holdout` for `1 - split_fraction`."""
  if key == "layout":
    return _lookup(cfg, "layout")[1] or _lookup(cfg, "task_layout")[1] or "padded"
  if key == "split_fraction":
    holdout = _lookup(cfg, "holdout")[1]
    if holdout is not None:
      return 1.0 - float(holdout)
  present, value = _lookup(cfg, key)
  if present:
    return value
  return default_data_config().get(key)
