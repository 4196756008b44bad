"""Chat templates: render prompt turns and a response to text, with the template's special pieces.

  hh      "\\n\\nHuman: {user}\\n\\nAssistant: {assistant}...\\n\\nAssistant:" + " {response}"
  gemma   "<start_of_turn>user\\n{user}<end_of_turn>\\n<start_of_turn>model\\n" + "{response}<end_of_turn>\\n"
  llama3  "<|start_header_id|>user<|end_header_id|>\\n\\n{user}<|eot_id|>...assistant<|end_header_id|>\\n\\n"
          + "{response}<|eot_id|>"
  none    turns joined by "\\n\\n" + response as is

BOS / EOS ids are not text: the tokenizer adds them (`Tokenizer.encode_prompt/encode_response`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

Turns = Sequence[tuple[str, str]]


@dataclasses.dataclass(frozen=True)
class Template:
  name: str
  render_prompt: Callable[[Turns], str]
  render_response: Callable[[str], str]
  specials: tuple[str, ...] = ()


def _hh_prompt(turns: Turns) -> str:
  names = {"user": "Human", "assistant": "Assistant", "system": "Human"}
  return "".join(f"\n\n{names[r]}: {c}" for r, c in turns) + "\n\nAssistant:"


def _merge_system(turns: Turns) -> list[tuple[str, str]]:
  """Gemma has no system role: the system text goes in front of the first user turn."""
  out, system = [], ""
  for role, content in turns:
    if role == "system":
      system += content + "\n\n"
    elif role == "user" and system:
      out.append((role, system + content))
      system = ""
    else:
      out.append((role, content))
  return out


def _gemma_prompt(turns: Turns) -> str:
  parts = [f"<start_of_turn>{'model' if r == 'assistant' else 'user'}\n{c}<end_of_turn>\n"
           for r, c in _merge_system(turns)]
  return "".join(parts) + "<start_of_turn>model\n"


def _llama3_prompt(turns: Turns) -> str:
  parts = [f"<|start_header_id|>{r}<|end_header_id|>\n\n{c}<|eot_id|>" for r, c in turns]
  return "".join(parts) + "<|start_header_id|>assistant<|end_header_id|>\n\n"


def _none_prompt(turns: Turns) -> str:
  return "\n\n".join(c for _, c in turns)


TEMPLATES: dict[str, Template] = {
    "hh": Template("hh", _hh_prompt, lambda r: r if r.startswith(" ") else " " + r),
    "gemma": Template("gemma", _gemma_prompt, lambda r: r + "<end_of_turn>\n",
                      ("<start_of_turn>", "<end_of_turn>")),
    "llama3": Template("llama3", _llama3_prompt, lambda r: r + "<|eot_id|>",
                       ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    "none": Template("none", _none_prompt, lambda r: r),
}


def get_template(name: str) -> Template:
  try:
    return TEMPLATES[name]
  except KeyError:
    raise ValueError(f"unknown data.chat_template {name!r}; known: {', '.join(TEMPLATES)}") from None


def render_prompt(template: Template, turns: Turns, prompt_text: str | None = None) -> str:
  """Renders the prompt; the hh template keeps a raw HH transcript prompt byte-for-byte."""
  if template.name == "hh" and prompt_text is not None:
    return prompt_text
  return template.render_prompt(turns)
