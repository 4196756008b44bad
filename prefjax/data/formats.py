"""Format adapters: one raw record (dict) -> a canonical `Example`.

Formats (`data.format`, "auto" detects per record from its keys):
  explicit        {"prompt", "chosen", "rejected"[, "margin"]}   (also UltraFeedback, HHH)
  conversational  {"chosen": [messages], "rejected": [messages]} (optional "prompt": [messages])
  hh              {"chosen": "\n\nHuman: ...\n\nAssistant: ...", "rejected": ...}
  unpaired        {"prompt", "completion", "label"}
  rankings        {"prompt", "responses": [...], "scores" | "ranks": [...][, "margin"]}
  sft             {"prompt", "completion"} or {"messages": [...]}
  pandalm         PandaLM test set: majority of annotator1..3 (ties dropped as "tie")
  llmbar          LLMBar {"input", "output_1", "output_2", "label" in {1, 2}}
  hhh             HHH alignment {"prompt", "chosen", "rejected"} (alias of explicit)
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

from prefjax.data.errors import BadRecord

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class Example:
  """A parsed record. `prompt` is a tuple of (role, content) ending with a user turn."""
  kind: str                       # "pairs" | "unpaired" | "sft" | "rankings"
  prompt: tuple[tuple[str, str], ...]
  responses: tuple[str, ...]      # pairs: (chosen, rejected); unpaired/sft: (completion,)
  scores: tuple[float, ...] | None = None
  label: float | None = None
  margin: float | None = None
  prompt_text: str | None = None  # raw HH transcript prompt (rendered as-is by the hh template)

  def first_user_turn(self) -> str:
    for role, content in self.prompt:
      if role == "user":
        return content
    return self.prompt_text or ""


def _get(rec: dict, field: str, types: Any, *, optional: bool = False) -> Any:
  if field not in rec or rec[field] is None:
    if optional:
      return None
    raise BadRecord("missing_field", "missing field", field)
  value = rec[field]
  if not isinstance(value, types) or isinstance(value, bool) and bool not in _as_tuple(types):
    names = "/".join(t.__name__ for t in _as_tuple(types))
    raise BadRecord("wrong_type", f"expected {names}, got {type(value).__name__}", field)
  return value


def _as_tuple(types: Any) -> tuple:
  return types if isinstance(types, tuple) else (types,)


def _response(rec: dict, field: str) -> str:
  text = _get(rec, field, str)
  if not text.strip():
    raise BadRecord("empty_response", "empty response", field)
  return text


def _nonempty(text: str, field: str) -> str:
  if not text.strip():
    raise BadRecord("empty_response", "empty response", field)
  return text


def _messages(value: Any, field: str) -> list[tuple[str, str]]:
  if not isinstance(value, list) or not value:
    raise BadRecord("wrong_type", "expected a non-empty list of messages", field)
  out = []
  for k, m in enumerate(value):
    if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(
        m.get("content"), str):
      raise BadRecord("wrong_type", f"message {k} needs string 'role' and 'content'", field)
    role = {"human": "user", "model": "assistant", "gpt": "assistant"}.get(m["role"], m["role"])
    if role not in ROLES:
      raise BadRecord("wrong_type", f"message {k} has unknown role {m['role']!r}", field)
    out.append((role, m["content"]))
  return out


def _prompt_messages(rec: dict, field: str = "prompt") -> tuple[tuple[str, str], ...]:
  value = rec.get(field)
  if isinstance(value, list):
    return tuple(_messages(value, field))
  text = _get(rec, field, str)
  if not text.strip():
    raise BadRecord("missing_field", "empty prompt", field)
  return (("user", text),)


def _finite(value: float, field: str) -> float:
  """`value` as a float; NaN / inf (JSON's NaN, Infinity) is a bad record naming `field`."""
  value = float(value)
  if not math.isfinite(value):
    raise BadRecord("non_finite", f"{value} is not a finite number", field)
  return value


def _margin(rec: dict) -> float | None:
  m = _get(rec, "margin", (int, float), optional=True)
  return None if m is None else _finite(m, "margin")


def parse_hh_transcript(text: str) -> tuple[tuple[str, str], ...]:
  """Splits "\\n\\nHuman: a\\n\\nAssistant: b..." into (role, content) turns."""
  turns, pos = [], 0
  markers = {HUMAN: "user", ASSISTANT: "assistant"}
  while True:
    nxt = [(text.find(m, pos), m) for m in markers if text.find(m, pos) >= 0]
    if not nxt:
      break
    start, marker = min(nxt)
    if turns:
      turns[-1][1] = text[turns[-1][2]:start]
    turns.append([markers[marker], "", start + len(marker)])
    pos = start + len(marker)
  if turns:
    turns[-1][1] = text[turns[-1][2]:]
  return tuple((role, content[1:] if content.startswith(" ") else content)
               for role, content, _ in turns)


def explicit(rec: dict) -> Example:
  prompt, prompt_text = _prompt_messages(rec), None
  raw = rec["prompt"]
  if isinstance(raw, str) and raw.startswith(HUMAN) and raw.rstrip().endswith(ASSISTANT.strip()):
    # A prompt that is already an HH transcript (e.g. TRL's HH datasets): keep it verbatim.
    prompt_text = raw.rstrip()
    prompt = parse_hh_transcript(prompt_text)[:-1]
  return Example("pairs", prompt, (_response(rec, "chosen"), _response(rec, "rejected")),
                 margin=_margin(rec), prompt_text=prompt_text)


def conversational(rec: dict) -> Example:
  chosen, rejected = _messages(rec.get("chosen"), "chosen"), _messages(rec.get("rejected"),
                                                                        "rejected")
  prompt = list(_messages(rec["prompt"], "prompt")) if isinstance(rec.get("prompt"), list) else []
  if not prompt:
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
      n += 1
    prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
  responses = []
  for field, msgs in (("chosen", chosen), ("rejected", rejected)):
    if len(msgs) != 1 or msgs[0][0] != "assistant":
      raise BadRecord("wrong_type", "after the shared prompt turns, expected exactly one "
                      "assistant message", field)
    responses.append(_nonempty(msgs[0][1], field))
  if not prompt or prompt[-1][0] == "assistant":
    raise BadRecord("missing_field", "no user turn before the responses", "chosen")
  return Example("pairs", tuple(prompt), tuple(responses), margin=_margin(rec))


def _common_prefix_len(a: str, b: str) -> int:
  lo, hi = 0, min(len(a), len(b))  # bisection over C-speed slice comparisons
  while lo < hi:
    mid = (lo + hi + 1) // 2
    if a[:mid] == b[:mid]:
      lo = mid
    else:
      hi = mid - 1
  return lo


def hh(rec: dict) -> Example:
  chosen, rejected = _get(rec, "chosen", str), _get(rec, "rejected", str)
  cut = chosen.rfind(ASSISTANT, 0, _common_prefix_len(chosen, rejected))
  if cut < 0:
    field = "chosen" if ASSISTANT not in chosen else "rejected"
    raise BadRecord("missing_field", "no shared '\\n\\nHuman: ... \\n\\nAssistant:' prompt", field)
  end = cut + len(ASSISTANT)
  prompt_text = chosen[:end]
  responses = tuple(_nonempty(t[end:][1:] if t[end:].startswith(" ") else t[end:], f)
                    for t, f in ((chosen, "chosen"), (rejected, "rejected")))
  turns = parse_hh_transcript(prompt_text)[:-1]
  if not turns or turns[0][0] != "user":
    raise BadRecord("missing_field", "transcript does not start with a Human turn", "chosen")
  return Example("pairs", turns, responses, margin=_margin(rec), prompt_text=prompt_text)


def unpaired(rec: dict) -> Example:
  label = _get(rec, "label", (bool, int, float))
  if isinstance(label, (int, float)) and not isinstance(label, bool) and label not in (0, 1):
    raise BadRecord("wrong_type", f"label must be true/false or 0/1, got {label}", "label")
  return Example("unpaired", _prompt_messages(rec), (_response(rec, "completion"),),
                 label=float(label))


def rankings(rec: dict) -> Example:
  responses = _get(rec, "responses", list)
  if len(responses) < 2:
    raise BadRecord("too_few_responses", "need at least 2 responses", "responses")
  for k, r in enumerate(responses):
    if not isinstance(r, str):
      raise BadRecord("wrong_type", f"response {k} is not a string", "responses")
    _nonempty(r, "responses")
  field = "scores" if "scores" in rec else "ranks"
  vals = _get(rec, field, list)
  if len(vals) != len(responses) or not all(
      isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
    raise BadRecord("wrong_type", f"expected {len(responses)} numbers", field)
  scores = tuple(_finite(v, field) * (1.0 if field == "scores" else -1.0) for v in vals)
  return Example("rankings", _prompt_messages(rec), tuple(responses), scores=scores,
                 margin=_margin(rec))


def sft(rec: dict) -> Example:
  if "messages" in rec:
    msgs = _messages(rec["messages"], "messages")
    if len(msgs) < 2 or msgs[-1][0] != "assistant":
      raise BadRecord("wrong_type", "the last message must be an assistant turn", "messages")
    return Example("sft", tuple(msgs[:-1]), (_nonempty(msgs[-1][1], "messages"),))
  return Example("sft", _prompt_messages(rec), (_response(rec, "completion"),))


def pandalm(rec: dict) -> Example:
  instruction = _get(rec, "instruction", str)
  extra = _get(rec, "input", str, optional=True)
  prompt = instruction + ("\n\n" + extra if extra and extra.strip() else "")
  votes = [_get(rec, f"annotator{k}", int) for k in (1, 2, 3)]
  winner = next((c for c in (1, 2) if votes.count(c) >= 2), 0)
  if winner == 0:
    raise BadRecord("tie", "annotators tie (no majority for 1 or 2)", "annotator1")
  # Upstream quirk: six answers "True" were stored as JSON booleans; read them as text.
  rec = {**rec, **{k: str(rec[k]) for k in ("response1", "response2")
                   if isinstance(rec.get(k), bool)}}
  r1, r2 = _response(rec, "response1"), _response(rec, "response2")
  responses = (r1, r2) if winner == 1 else (r2, r1)
  return Example("pairs", (("user", prompt),), responses)


def llmbar(rec: dict) -> Example:
  label = _get(rec, "label", int)
  if label not in (1, 2):
    raise BadRecord("wrong_type", f"label must be 1 or 2, got {label}", "label")
  o1, o2 = _response(rec, "output_1"), _response(rec, "output_2")
  responses = (o1, o2) if label == 1 else (o2, o1)
  return Example("pairs", _prompt_messages(rec, "input"), responses)


FORMATS: dict[str, Callable[[dict], Example]] = {
    "explicit": explicit, "conversational": conversational, "hh": hh, "unpaired": unpaired,
    "rankings": rankings, "sft": sft, "pandalm": pandalm, "llmbar": llmbar, "hhh": explicit,
}


def detect(rec: dict) -> str:
  """Names the format of one record from its keys."""
  if "responses" in rec:
    return "rankings"
  if "response1" in rec and "annotator1" in rec:
    return "pandalm"
  if "output_1" in rec and "output_2" in rec:
    return "llmbar"
  if "completion" in rec:
    return "unpaired" if "label" in rec else "sft"
  if "messages" in rec:
    return "sft"
  if "chosen" in rec or "rejected" in rec:
    if isinstance(rec.get("chosen"), list) or isinstance(rec.get("rejected"), list):
      return "conversational"
    if "prompt" in rec:
      return "explicit"
    if isinstance(rec.get("chosen"), str) and HUMAN in rec["chosen"]:
      return "hh"
    raise BadRecord("missing_field", "no 'prompt' and 'chosen' is not an HH transcript", "prompt")
  raise BadRecord("missing_field", "cannot detect the format (no chosen/rejected, completion, "
                  "responses or messages)", "chosen")


def parse(rec: dict, fmt: str = "auto") -> Example:
  """Parses one record; raises `BadRecord` naming the field on malformed input."""
  if fmt == "auto":
    fmt = detect(rec)
  try:
    fn = FORMATS[fmt]
  except KeyError:
    raise ValueError(f"unknown data.format {fmt!r}; known: auto, {', '.join(FORMATS)}") from None
  return fn(rec)


def num_items(ex: Example, kind: str) -> int:
  """How many training items `ex` gives for `kind` (a pair gives 2 unpaired items)."""
  return 2 if kind == "unpaired" and ex.kind == "pairs" else 1


def to_kind(ex: Example, kind: str, sub: int = 0) -> Example:
  """Converts a parsed example to the task `kind` (item `sub` of `num_items`)."""
  if ex.kind == kind:
    return ex
  if ex.kind == "pairs" and kind == "unpaired":
    return dataclasses.replace(ex, kind=kind, responses=(ex.responses[sub],),
                               label=1.0 - sub, margin=None)
  if ex.kind == "pairs" and kind == "sft":
    return dataclasses.replace(ex, kind=kind, responses=ex.responses[:1], margin=None)
  if ex.kind == "pairs" and kind == "rankings":
    return dataclasses.replace(ex, kind=kind, scores=(1.0, 0.0))
  if ex.kind == "rankings" and kind == "pairs":
    best = max(range(len(ex.scores)), key=lambda k: (ex.scores[k], -k))
    worst = min(range(len(ex.scores)), key=lambda k: (ex.scores[k], k))
    if ex.scores[best] == ex.scores[worst]:
      raise BadRecord("tie", "all responses have the same score", "scores")
    return dataclasses.replace(ex, kind=kind, responses=(ex.responses[best], ex.responses[worst]),
                               scores=None)
  raise BadRecord("wrong_type", f"a {ex.kind} record cannot be used as {kind}", "kind")
