"""Helpers for the data tests: files written by the tests, the shipped tokenizer."""
import gzip
import json
import pathlib

import pytest

from prefjax import data


@pytest.fixture(scope="session")
def tok():
  return data.load_tokenizer("mistral_v1")


@pytest.fixture(scope="session")
def gemma_tok(shared_dir):
  return data.load_tokenizer(str(shared_dir / "tokenizers" / "gemma" / "tokenizer.model"))


def write_jsonl(path: pathlib.Path, records, *, gz: bool = False) -> str:
  lines = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
  raw = lines.encode("utf-8")
  path.write_bytes(gzip.compress(raw) if gz else raw)
  return str(path)


def pairs(n: int, *, prefix: str = "q"):
  """n distinct explicit pairs with short prompts and responses of varying length."""
  return [{"prompt": f"{prefix} question {i}?", "chosen": "good answer " + "yes " * (i % 7),
           "rejected": "bad answer " + "no " * (i % 5)} for i in range(n)]


def config(train, **kw):
  cfg = data.default_data_config()
  cfg.train = train
  cfg.split_fraction = None
  cfg.max_len, cfg.max_prompt_len, cfg.max_response_len = 64, 24, 24
  cfg.batch_size = 4
  cfg.update(kw)
  return cfg
