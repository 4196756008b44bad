r"""Inspect a dataset as the pipeline sees it.

  python -m prefjax.data.inspect --train=PATH [--tokenizer=mistral_v1] [--format=auto]

Prints JSON: records, usable pairs, dropped by reason (with first locations), token-length
percentiles, truncation rate, the padding fraction of each layout over one epoch, then a few
rendered examples (prompt | [response tokens, the ones under the loss mask]).
"""
from __future__ import annotations

import json

from absl import app
from absl import flags
from absl import logging

from prefjax.data import config as config_lib
from prefjax.data.stats import length_stats, padding_fraction
from prefjax.data.tokenizer import load_tokenizer

_TRAIN = flags.DEFINE_string("train", None, "Path or glob of the records.", required=True)
_TOKENIZER = flags.DEFINE_string("tokenizer", "mistral_v1", "Tokenizer path or name.")
_FORMAT = flags.DEFINE_string("format", "auto", "Record format (see prefjax.data.formats).")
_KIND = flags.DEFINE_string("kind", "pairs", "pairs | unpaired | sft | rankings.")
_TEMPLATE = flags.DEFINE_string("chat_template", "hh", "hh | gemma | llama3 | none.")
_MAX_LEN = flags.DEFINE_integer("max_len", 512, "Tokens per sequence (padded layout).")
_PACK_LEN = flags.DEFINE_integer("pack_len", 0, "Packed row length; 0: 2 x max_len.")
_MAX_PROMPT = flags.DEFINE_integer("max_prompt_len", 256, "Prompt tokens kept (left cut).")
_MAX_RESPONSE = flags.DEFINE_integer("max_response_len", 256, "Response tokens kept.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Pairs (padded) or rows (packed) per batch.")
_POLICY = flags.DEFINE_string("on_bad_record", "skip", "error | skip.")
_EXAMPLES = flags.DEFINE_integer("num_examples", 2, "Rendered examples to print.")


def _config():
  cfg = config_lib.default_data_config()
  cfg.update(train=_TRAIN.value, format=_FORMAT.value, kind=_KIND.value,
             chat_template=_TEMPLATE.value, max_len=_MAX_LEN.value,
             max_prompt_len=_MAX_PROMPT.value, max_response_len=_MAX_RESPONSE.value,
             batch_size=_BATCH.value, on_bad_record=_POLICY.value, split_fraction=None)
  return cfg


def _render(tok, batch: dict, n: int) -> list[dict]:
  out = []
  for b in range(min(n, batch["tokens"].shape[0])):
    rows = batch["tokens"][b].reshape(-1, batch["tokens"].shape[-1])
    masks = batch["loss_mask"][b].reshape(rows.shape)
    targets = batch["targets"][b].reshape(rows.shape)
    seqs = []
    for row, mask, tgt in zip(rows, masks, targets):
      real = batch["segment_ids"][b].reshape(rows.shape)[len(seqs)] > 0
      seqs.append({"text": tok.decode(row[real]),
                   "loss_on": tok.decode(tgt[mask > 0]),
                   "tokens": int(real.sum()), "loss_tokens": int(mask.sum())})
    out.append({"example": b, "sequences": seqs})
  return out


def main(argv):
  del argv
  logging.set_verbosity(logging.ERROR)
  cfg = _config()
  tok = load_tokenizer(_TOKENIZER.value)
  report = {"train": _TRAIN.value, "tokenizer": _TOKENIZER.value, "vocab_size": tok.vocab_size}
  report.update(length_stats(cfg, tok))
  pack_len = _PACK_LEN.value or 2 * _MAX_LEN.value
  report["padding"] = [
      padding_fraction(cfg, tok, layout="padded"),
      padding_fraction(cfg, tok, layout="packed", max_len=pack_len),
      padding_fraction(cfg, tok, layout="prompt_shared", max_len=pack_len),
      padding_fraction(cfg, tok, layout="prompt_shared", max_len=_MAX_LEN.value),
  ]
  print(json.dumps(report, indent=1))
  from prefjax.data.pipeline import make_pipeline  # pylint: disable=g-import-not-at-top
  cfg.shuffle, cfg.num_epochs = False, 1
  batch = next(make_pipeline(cfg, tok))
  for ex in _render(tok, batch, _EXAMPLES.value):
    print(json.dumps(ex, indent=1, ensure_ascii=False))


if __name__ == "__main__":
  app.run(main)
