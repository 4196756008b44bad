"""Dataset statistics shared by the inspect tool, the benchmark and the tests."""
from __future__ import annotations

import copy
from typing import Any

import numpy as np

from prefjax.data import config as config_lib
from prefjax.data.index import build_index
from prefjax.data.pipeline import Featurizer, Settings, make_pipeline
from prefjax.data.tokenize import encode
from prefjax.data.tokenizer import Tokenizer


def padding_fraction(data_config: Any, tokenizer: Tokenizer, **overrides: Any) -> dict:
  """Runs one shuffled epoch of the train pipeline and measures padding over all batches."""
  cfg = copy.deepcopy(data_config)
  for k, v in {**overrides, "num_epochs": 1, "worker_count": 0}.items():
    cfg[k] = v
  pipe = make_pipeline(cfg, tokenizer)
  real = slots = pairs = batches = 0
  for batch in pipe:
    seg = batch["segment_ids"]
    real += int((seg > 0).sum())
    slots += seg.size
    pairs += int(batch["pair_mask"].sum()) if "pair_mask" in batch else seg.shape[0]
    batches += 1
  return {"layout": config_lib.get(cfg, "layout"), "max_len": int(config_lib.get(cfg, "max_len")),
          "batches": batches, "pairs": pairs, "real_tokens": real, "slots": slots,
          "padding_fraction": round(1.0 - real / max(slots, 1), 4),
          "pairs_per_batch": round(pairs / max(batches, 1), 2)}


def length_stats(data_config: Any, tokenizer: Tokenizer) -> dict:
  """Token lengths (before truncation), truncation rate and drops over the train split."""
  s = Settings.from_config(data_config)
  g = lambda k: config_lib.get(data_config, k)  # noqa: E731
  index = build_index(g("train"), fmt=s.fmt, kind=s.kind, policy=s.policy, part="train",
                      fraction=g("split_fraction"))
  feat = Featurizer(index.source, s, tokenizer)
  prompt, response, total, truncated, kept = [], [], [], 0, 0
  for item in index.items:
    ex = feat.example(item)
    t = encode(ex, tokenizer, s.template)
    prompt.append(len(t.prompt))
    response.extend(len(r) for r in t.responses)
    total.append(len(t.prompt) + max(len(r) for r in t.responses))
    el = feat(item)
    kept += el is not None
    if el is not None and el.get("truncated", False):
      truncated += 1
  pct = lambda xs: {f"p{q}": int(np.percentile(xs, q)) for q in (50, 90, 99, 100)}  # noqa: E731
  dropped = index.stats
  dropped.merge(feat.dropped)
  return {"records": index.num_records, "items": len(index.items), "usable": kept,
          "dropped": dropped.as_dict(), "prompt_tokens": pct(prompt),
          "response_tokens": pct(response), "sequence_tokens": pct(total),
          "truncation_rate": round(truncated / max(kept, 1), 4)}
