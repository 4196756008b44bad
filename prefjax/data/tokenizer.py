"""SentencePiece tokenizer with per-family BOS/EOS rules and exact special-piece handling."""
from __future__ import annotations

import os
import pathlib
import re
from typing import Sequence

from etils import epath
import sentencepiece as spm

_ASSETS = pathlib.Path(__file__).resolve().parents[1] / "assets" / "tokenizers"
# Short names. "mistral_v1" ships with the package; the others are looked up under
# $PREFJAX_TOKENIZER_DIR/<name>/tokenizer.model, then ../shared/tokenizers beside the checkout.
_NAMES = {"mistral_v1": "mistral-v1", "mistral-v1": "mistral-v1", "gemma": "gemma",
          "gemma2": "gemma", "gemma3": "gemma3"}


class Tokenizer:
  """Wraps a SentencePiece model. Picklable (keeps the serialized model proto).

  Rules: prompts start with BOS, responses end with EOS (Gemma: <bos>=2, <eos>=1;
  Llama/Mistral: <s>=1, </s>=2). Pad id is the model's pad piece, else 0.
  Special strings (e.g. "<start_of_turn>") that are single pieces of the vocabulary are
  mapped straight to their ids; absent ones are encoded as plain text.
  """

  def __init__(self, model_proto: bytes, *, name: str = "", add_bos: bool = True,
               add_eos: bool = True):
    self.name, self.add_bos, self.add_eos = name, add_bos, add_eos
    self._proto = model_proto
    self._load()

  def _load(self) -> None:
    self.sp = spm.SentencePieceProcessor(model_proto=self._proto)
    self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
    self.pad_id = max(self.sp.pad_id(), 0)
    self.vocab_size = self.sp.get_piece_size()
    # The longest piece in characters: N tokens never cover more than N * this.
    self.max_piece_chars = max(len(self.sp.id_to_piece(i)) for i in range(self.vocab_size))
    # Llama/Mistral models prepend "▁" to every encode() call: a response " text" is then
    # encoded from "text" so that it gets the same pieces as inside the whole transcript.
    self.dummy_prefix = self.sp.encode("a", out_type=str)[0].startswith("\u2581")
    self.family = "gemma" if self.piece_id("<start_of_turn>") is not None else "llama"
    self._split_cache: dict[tuple[str, ...], tuple[re.Pattern | None, dict[str, int]]] = {}

  def __getstate__(self):
    return {"name": self.name, "add_bos": self.add_bos, "add_eos": self.add_eos,
            "_proto": self._proto}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._load()

  def piece_id(self, piece: str) -> int | None:
    i = self.sp.piece_to_id(piece)
    return None if i == self.sp.unk_id() and piece != self.sp.id_to_piece(i) else i

  def _splitter(self, specials: Sequence[str]):
    key = tuple(specials)
    if key not in self._split_cache:
      ids = {s: self.piece_id(s) for s in specials}
      ids = {s: i for s, i in ids.items() if i is not None}
      pattern = re.compile("(" + "|".join(map(re.escape, ids)) + ")") if ids else None
      self._split_cache[key] = (pattern, ids)
    return self._split_cache[key]

  def encode(self, text: str, specials: Sequence[str] = ()) -> list[int]:
    """Encodes text (no BOS/EOS); `specials` present in the vocabulary become single ids."""
    pattern, ids = self._splitter(specials)
    if pattern is None:
      return self.sp.encode(text) if text else []
    out: list[int] = []
    for part in pattern.split(text):
      if part in ids:
        out.append(ids[part])
      elif part:
        out.extend(self.sp.encode(part))
    return out

  def encode_prompt(self, text: str, specials: Sequence[str] = ()) -> list[int]:
    return ([self.bos_id] if self.add_bos and self.bos_id >= 0 else []) + self.encode(text, specials)

  def encode_response(self, text: str, specials: Sequence[str] = ()) -> list[int]:
    if self.dummy_prefix and text.startswith(" "):
      text = text[1:]
    return self.encode(text, specials) + ([self.eos_id] if self.add_eos and self.eos_id >= 0 else [])

  def decode(self, ids: Sequence[int]) -> str:
    return self.sp.decode([int(i) for i in ids])


def _resolve(name_or_path: str) -> str:
  if name_or_path in _NAMES:
    folder = _NAMES[name_or_path]
    if folder == "mistral-v1":
      return str(_ASSETS / "mistral_v1" / "tokenizer.model")
    roots = [os.environ.get("PREFJAX_TOKENIZER_DIR", ""),
             str(pathlib.Path(__file__).resolve().parents[3] / "shared" / "tokenizers")]
    for root in filter(None, roots):
      p = pathlib.Path(root) / folder / "tokenizer.model"
      if p.exists():
        return str(p)
    raise FileNotFoundError(f"tokenizer {name_or_path!r} not found; give a path to its "
                            "tokenizer.model or set $PREFJAX_TOKENIZER_DIR")
  return name_or_path


def load_tokenizer(path_or_name: str, *, add_bos: bool = True, add_eos: bool = True) -> Tokenizer:
  """Loads a SentencePiece model from a path (local or gs://) or a short name.

  Names: "mistral_v1" (shipped with the package), "gemma" / "gemma3" (found through
  $PREFJAX_TOKENIZER_DIR or ../shared/tokenizers). A local `.gguf` model file gives the
  SentencePiece vocabulary stored inside it (`models.sentencepiece_model_from_gguf`).
  """
  path = _resolve(os.fspath(path_or_name))
  p = epath.Path(path)
  if not p.exists():
    raise FileNotFoundError(f"tokenizer model not found: {path}")
  if path.endswith(".gguf"):
    from prefjax.models import gguf  # pylint: disable=g-import-not-at-top
    proto = gguf.sentencepiece_model_from_gguf(path)
  else:
    proto = p.read_bytes()
  return Tokenizer(proto, name=str(path_or_name), add_bos=add_bos, add_eos=add_eos)
