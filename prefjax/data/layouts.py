"""Per-example features and batch collation for the non-packed layouts (docs/internals.md).

An element (output of `Featurizer`) is a dict: `prompt` int32 [P], `responses` list of int32
arrays, and `label` / `scores` / `margin` where the kind has them; `None` when dropped.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from prefjax.data.tokenize import sequence

BLANK = {"blank": True}  # a masked slot (eval padding / dropped item)
SEQ_KEYS = ("tokens", "targets", "loss_mask", "positions", "segment_ids")


def is_blank(e: dict | None) -> bool:
  return e is None or "blank" in e


def _real(elements: Sequence[dict | None]) -> list[dict | None]:
  return [None if is_blank(e) else e for e in elements]


def _empty(shape: tuple[int, ...]) -> dict:
  return {k: np.zeros(shape, np.float32 if k == "loss_mask" else np.int32) for k in SEQ_KEYS}


def _put(out: dict, index: tuple, prompt, response, pad_id: int, prefix: str = "") -> None:
  s = sequence(prompt, response, pad_id)
  n = len(s["tokens"])
  for k in ("tokens", "targets", "loss_mask", "positions"):
    out[prefix + k][index + (slice(0, n),)] = s[k]
  out[prefix + "segment_ids"][index + (slice(0, n),)] = 1


def _example_mask(elements: Sequence[dict | None], batch: int) -> np.ndarray:
  mask = np.zeros(batch, np.float32)
  mask[:len(elements)] = [e is not None for e in elements]
  return mask


def collate_pairs(elements: Sequence[dict | None], *, batch: int, length: int, has_margin: bool,
                  pad_id: int = 0, eval_mask: bool = False) -> dict:
  """Padded pairs: [B, 2, L] (0 chosen, 1 rejected), optional `margin` [B]."""
  elements = _real(elements)
  out = _empty((batch, 2, length))
  margin = np.zeros(batch, np.float32)
  for b, e in enumerate(elements):
    if e is None:
      continue
    for k in range(2):
      _put(out, (b, k), e["prompt"], e["responses"][k], pad_id)
    margin[b] = e.get("margin") or 0.0
  if has_margin:
    out["margin"] = margin
  if eval_mask:
    out["example_mask"] = _example_mask(elements, batch)
  return out


def collate_sft(elements: Sequence[dict | None], *, batch: int, length: int, pad_id: int = 0,
                eval_mask: bool = False) -> dict:
  """SFT: [B, L] five keys."""
  elements = _real(elements)
  out = _empty((batch, length))
  for b, e in enumerate(elements):
    if e is not None:
      _put(out, (b,), e["prompt"], e["responses"][0], pad_id)
  if eval_mask:
    out["example_mask"] = _example_mask(elements, batch)
  return out


def collate_unpaired(elements: Sequence[dict | None], *, batch: int, length: int,
                     pad_id: int = 0, eval_mask: bool = False) -> dict:
  """KTO/BCO: [B, L] + `label` [B] + the mismatched KL batch: prompt i with completion i+1."""
  elements = _real(elements)
  out = collate_sft(elements, batch=batch, length=length, pad_id=pad_id, eval_mask=eval_mask)
  out.update({"kl_" + k: v for k, v in _empty((batch, length)).items()})
  out["label"] = np.zeros(batch, np.float32)
  real = [b for b, e in enumerate(elements) if e is not None]
  for j, b in enumerate(real):
    e = elements[b]
    out["label"][b] = e["label"]
    other = elements[real[(j + 1) % len(real)]]["responses"][0]
    room = length - len(e["prompt"])
    _put(out, (b,), e["prompt"], other[:room], pad_id, prefix="kl_")
  return out


def collate_rankings(elements: Sequence[dict | None], *, batch: int, length: int,
                     num_responses: int, has_margin: bool = False, pad_id: int = 0,
                     eval_mask: bool = False) -> dict:
  """K-wise: [B, K, L] + `scores` [B, K] + `response_mask` [B, K] (+ `margin` [B])."""
  elements = _real(elements)
  out = _empty((batch, num_responses, length))
  out["scores"] = np.zeros((batch, num_responses), np.float32)
  out["response_mask"] = np.zeros((batch, num_responses), np.float32)
  for b, e in enumerate(elements):
    if e is None:
      continue
    for k, r in enumerate(e["responses"][:num_responses]):
      _put(out, (b, k), e["prompt"], r, pad_id)
      out["scores"][b, k] = e["scores"][k]
      out["response_mask"][b, k] = 1.0
  if has_margin:
    out["margin"] = np.asarray([(e or {}).get("margin") or 0.0 for e in elements]
                               + [0.0] * (batch - len(elements)), np.float32)
  if eval_mask:
    out["example_mask"] = _example_mask(elements, batch)
  return out
