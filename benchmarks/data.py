r"""Throughput of the prefjax.data pipeline on HH-RLHF (prints JSON).

  python benchmarks/data.py [--layouts=padded,packed,prompt_shared] [--workers=0,2]

Data: the four HH-RLHF test files under ../shared/data when present, else the shipped
helpful-base file. Tokenizer: Gemma (../shared/tokenizers/gemma) when present, else the
shipped Mistral-v1 model. One epoch per setting; pairs/s counts real pairs delivered
(index construction timed separately).
"""
from __future__ import annotations

import json
import pathlib
import os
import platform
import resource
import sys
import time

from absl import app
from absl import flags
from absl import logging

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from prefjax import data  # noqa: E402  pylint: disable=g-import-not-at-top

_LAYOUTS = flags.DEFINE_list("layouts", ["padded", "packed", "prompt_shared"], "Layouts to run.")
_WORKERS = flags.DEFINE_list("workers", ["0", "2"], "grain worker_count values.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Pairs (padded) or rows (packed) per batch.")
_MAX_LEN = flags.DEFINE_integer("max_len", 512, "Padded sequence length (packed rows: 2x).")

_SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared"


def _inputs() -> tuple[list[str], str]:
  hh = sorted(str(p) for p in (_SHARED / "data" / "hh-rlhf").glob("*/test.jsonl.gz"))
  gemma = _SHARED / "tokenizers" / "gemma" / "tokenizer.model"
  return (hh or [data.default_data_config().train],
          str(gemma) if gemma.exists() else "mistral_v1")


def _run(train: list[str], tok: data.Tokenizer, layout: str, workers: int) -> dict:
  cfg = data.default_data_config()
  packed = layout != "padded"
  cfg.update(train=train, split_fraction=None, on_bad_record="skip", num_epochs=1,
             layout=layout, batch_size=_BATCH.value, worker_count=workers,
             max_len=_MAX_LEN.value * (2 if packed else 1), max_pairs_per_row=16)
  t0 = time.perf_counter()
  cpu0 = _cpu_s()
  pipe = data.make_pipeline(cfg, tok)
  t1 = time.perf_counter()
  pairs = batches = real = slots = 0
  for batch in pipe:
    batches += 1
    pairs += int(batch["pair_mask"].sum()) if packed else batch["tokens"].shape[0]
    real += int((batch["segment_ids"] > 0).sum())
    slots += batch["segment_ids"].size
  t2 = time.perf_counter()
  pipe.close()
  cpu = _cpu_s() - cpu0
  return {"layout": layout, "worker_count": workers, "max_len": cfg.max_len,
          "batch_size": cfg.batch_size, "index_s": round(t1 - t0, 2),
          "iterate_s": round(t2 - t1, 2), "batches": batches, "pairs": pairs,
          "pairs_per_s": round(pairs / (t2 - t1), 1),
          "tokens_per_s": round(real / (t2 - t1)),
          "padding_fraction": round(1 - real / max(slots, 1), 4),
          "cpu_s": round(cpu, 2), "pairs_per_cpu_s": round(pairs / max(cpu, 1e-9), 1),
          "load_avg_1m": round(os.getloadavg()[0], 1)}


def _cpu_s() -> float:
  """User+system CPU seconds of this process and of its finished worker processes."""
  own = resource.getrusage(resource.RUSAGE_SELF)
  kids = resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main(argv):
  del argv
  logging.set_verbosity(logging.ERROR)
  train, tok_path = _inputs()
  tok = data.load_tokenizer(tok_path)
  results = [_run(train, tok, layout, int(w)) for layout in _LAYOUTS.value
             for w in _WORKERS.value]
  print(json.dumps({"benchmark": "prefjax.data", "files": train, "tokenizer": tok_path,
                    "vocab_size": tok.vocab_size, "cpus": os.cpu_count(),
                    "python": platform.python_version(), "results": results}, indent=1))


if __name__ == "__main__":
  app.run(main)
