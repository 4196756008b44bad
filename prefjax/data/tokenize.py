"""Render + tokenize an `Example`, truncate it to the layout's budget, and build per-sequence
arrays (`tokens`, `targets` = tokens shifted left, `loss_mask` on response targets incl. EOS).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from prefjax.data.formats import Example
from prefjax.data.templates import Template, render_prompt
from prefjax.data.tokenizer import Tokenizer

# Tokens one example needs in one row / sequence, as a function of (prompt len, response lens).
COSTS: dict[str, Callable[[int, Sequence[int]], int]] = {
    "padded": lambda p, rs: p + max(rs),            # each sequence on its own row
    "packed": lambda p, rs: sum(p + r for r in rs),  # prompt+chosen, prompt+rejected in one row
    "prompt_shared": lambda p, rs: p + 1 + sum(rs),  # shared prompt[:-1], then [p[-1]]+each response
}


@dataclasses.dataclass(frozen=True)
class Limits:
  max_len: int
  max_prompt_len: int
  max_response_len: int
  layout: str = "padded"

  def cost(self, p: int, rs: Sequence[int]) -> int:
    return COSTS[self.layout](p, rs)

  def validate(self, num_responses: int) -> None:
    if self.layout not in COSTS:
      raise ValueError(f"unknown data.layout {self.layout!r}; known: {', '.join(COSTS)}")
    if min(self.max_len, self.max_prompt_len, self.max_response_len) < 1:
      raise ValueError("data.max_len, max_prompt_len and max_response_len must be >= 1")
    if self.cost(self.max_prompt_len, [1] * num_responses) > self.max_len:
      raise ValueError(f"data.max_prompt_len={self.max_prompt_len} leaves no room for "
                       f"{num_responses} responses in data.max_len={self.max_len} "
                       f"(layout {self.layout})")


@dataclasses.dataclass
class Tokenized:
  prompt: list[int]
  responses: list[list[int]]
  truncated: bool = False


# Characters kept past the token budget when a text is cut before tokenizing, so that the
# pieces near the cut (merges across it) never reach the tokens that are kept.
CUT_MARGIN_CHARS = 1024


def char_budget(tok: Tokenizer, max_tokens: int) -> int:
  """Characters that always hold at least `max_tokens` tokens (no piece is longer than
  `tok.max_piece_chars` characters), plus a margin."""
  return max_tokens * tok.max_piece_chars + CUT_MARGIN_CHARS


def encode(ex: Example, tok: Tokenizer, template: Template,
           limits: Limits | None = None) -> Tokenized:
  """Renders the prompt with the chat template; BOS before the prompt, EOS after responses.

  With `limits`, a text far longer than its token budget is cut before tokenizing (the prompt
  keeps its end, a response its start; `char_budget` characters), so a huge record costs
  memory in proportion to the budget, not to its size; `truncate` then gives the same tokens.
  """
  prompt_text = render_prompt(template, ex.prompt, ex.prompt_text)
  responses_text = [template.render_response(r) for r in ex.responses]
  cut = False
  if limits is not None:
    pb, rb = char_budget(tok, limits.max_prompt_len), char_budget(tok, limits.max_response_len)
    if len(prompt_text) > pb:
      prompt_text, cut = prompt_text[-pb:], True
    if any(len(r) > rb for r in responses_text):
      responses_text, cut = [r[:rb] for r in responses_text], True
  prompt = tok.encode_prompt(prompt_text, template.specials)
  responses = [tok.encode_response(r, template.specials) for r in responses_text]
  return Tokenized(prompt, responses, cut)


def truncate(t: Tokenized, limits: Limits, *, keep_bos: bool) -> Tokenized:
  """Prompt from the left (BOS kept), responses from the right, then all to fit `max_len`."""
  prompt, responses = t.prompt, t.responses
  truncated = False
  if len(prompt) > limits.max_prompt_len:
    keep = limits.max_prompt_len - (1 if keep_bos else 0)
    prompt = (prompt[:1] if keep_bos else []) + (prompt[-keep:] if keep > 0 else [])
    truncated = True
  if any(len(r) > limits.max_response_len for r in responses):
    responses = [r[:limits.max_response_len] for r in responses]
    truncated = True
  lens = [len(r) for r in responses]
  if limits.cost(len(prompt), lens) > limits.max_len:
    lo, hi = 1, max(lens)  # largest cap with cost <= max_len (validate() guarantees cap 1 fits)
    while lo < hi:
      mid = (lo + hi + 1) // 2
      if limits.cost(len(prompt), [min(n, mid) for n in lens]) <= limits.max_len:
        lo = mid
      else:
        hi = mid - 1
    responses = [r[:lo] for r in responses]
    truncated = True
  return Tokenized(prompt, responses, truncated or t.truncated)


def sequence(prompt: Sequence[int], response: Sequence[int], pad_id: int = 0) -> dict:
  """One sequence prompt+response: tokens, targets, loss_mask (on response targets), positions."""
  tokens = np.asarray(list(prompt) + list(response), np.int32)
  targets = np.concatenate([tokens[1:], np.asarray([pad_id], np.int32)])
  loss_mask = np.zeros(len(tokens), np.float32)
  loss_mask[len(prompt) - 1:len(tokens) - 1] = 1.0
  return {"tokens": tokens, "targets": targets, "loss_mask": loss_mask,
          "positions": np.arange(len(tokens), dtype=np.int32)}
