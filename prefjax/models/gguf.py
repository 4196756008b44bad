"""GGUF import (llama.cpp's single-file format): Gemma 1/2/3 and Llama/Mistral causal LMs.

  cfg, params = models.load_gguf_checkpoint("gemma-3-270m-q4_k_m.gguf", mesh=mesh)
  proto = models.sentencepiece_model_from_gguf(path)   # serialized SentencePiece ModelProto

Every tensor is dequantized to float32 with the `gguf` package (`pip install prefjax[gguf]`),
renamed to its Hugging Face name and converted by the same entries as the HF importer
(`hf.conversion_entries`), one tensor at a time, so a sharded load never holds the whole model
on one host. Facts of the format that the conversion undoes (llama.cpp `convert_hf_to_gguf.py`,
GGUF spec https://github.com/ggml-org/ggml/blob/master/docs/gguf.md):

- A tensor of GGUF shape [n0, n1] is stored row-major as numpy [n1, n0]: the torch layout.
- Gemma 1/2/3: RMSNorm weights are stored with the +1 of Gemma's `x * (1 + w)` folded in
  (llama.cpp multiplies by `w`); every `*norm.weight` gets 1 subtracted back.
- Llama: the Q and K projections are stored with their rows permuted from the rotate-half
  order of HF into interleaved RoPE pairs; they are permuted back.
- Gemma 2/3 scale queries by 1/sqrt(head_dim), except the 27B models that use
  1/sqrt(embed_dim / num_heads) (llama.cpp keys this on the model size); an explicit
  `attention.scale` in the file wins. Gemma 3 local (sliding) layers use RoPE base 10,000 and
  every 6th layer is global unless the file says otherwise.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
from jax.sharding import Mesh

from prefjax.models import api
from prefjax.models import hf as hf_lib
from prefjax.models.config import ModelConfig

# GGUF `general.architecture` -> (transformers model_type, architecture prefix).
_ARCHS = {"gemma": ("gemma", "Gemma"), "gemma2": ("gemma2", "Gemma2"),
          "gemma3": ("gemma3_text", "Gemma3"), "llama": ("llama", "Llama")}
_GEMMA = ("gemma", "gemma2", "gemma3")

# HF per-layer tensor suffix -> GGUF per-layer tensor name (`blk.{i}.` + name).
_LAYER_NAMES = {
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight", "input_layernorm.weight": "attn_norm.weight",
}
# Norm names that differ between the two-norm (Gemma 1, Llama) and four-norm (Gemma 2/3) layers.
_LAYER_NORMS_2 = {"post_attention_layernorm.weight": "ffn_norm.weight"}
_LAYER_NORMS_4 = {"post_attention_layernorm.weight": "post_attention_norm.weight",
                  "pre_feedforward_layernorm.weight": "ffn_norm.weight",
                  "post_feedforward_layernorm.weight": "post_ffw_norm.weight"}
_GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight",
                 "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}

# GGUF token types (llama.cpp `llama_token_type`) are SentencePiece's piece types.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def _gguf():
  try:
    import gguf  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("reading .gguf files needs the `gguf` package: "
                      "pip install 'prefjax[gguf]' (or pip install gguf)") from e
  return gguf


class GGUFFile:
  """Metadata and tensors of one .gguf file (memory-mapped; tensors dequantized on demand)."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    if not os.path.isfile(self.path):
      raise FileNotFoundError(f"GGUF file not found: {self.path}")
    gguf = _gguf()
    try:
      self.reader = gguf.GGUFReader(self.path)
    except (ValueError, OSError) as e:
      raise ValueError(f"{self.path} is not a readable GGUF file: {e}") from e
    self._quants = gguf.quants
    self.tensors = {t.name: t for t in self.reader.tensors}
    self.arch = str(self.get("general.architecture"))

  def get(self, key: str, default: Any = None) -> Any:
    """Metadata value `key` (scalars and strings as Python values, arrays as lists)."""
    field = self.reader.fields.get(key)
    if field is None:
      return default
    return field.contents()

  def arch_get(self, key: str, default: Any = None) -> Any:
    """`<architecture>.<key>`, e.g. `embedding_length`."""
    return self.get(f"{self.arch}.{key}", default)

  def tensor(self, name: str) -> np.ndarray:
    """Tensor `name` dequantized to float32, numpy shape = GGUF shape reversed."""
    if name not in self.tensors:
      raise KeyError(f"{self.path} has no tensor {name!r}")
    t = self.tensors[name]
    return np.asarray(self._quants.dequantize(t.data, t.tensor_type), np.float32)


def _query_pre_attn_scalar(f: GGUFFile, embed: int, heads: int, head_dim: int,
                           layers: int) -> float | None:
  if f.arch not in ("gemma2", "gemma3"):
    return None
  scale = f.arch_get("attention.scale")
  if scale:
    value = 1.0 / float(scale) ** 2
  else:
    is_27b = (f.arch, layers) in (("gemma2", 46), ("gemma3", 62))
    value = embed / heads if is_27b else float(head_dim)
  return int(value) if float(value).is_integer() else value  # transformers wants an int


def _rope(f: GGUFFile) -> dict[str, Any]:
  """HF `rope_scaling`-style dict from `<arch>.rope.*`."""
  if "rope_freqs.weight" in f.tensors:
    raise ValueError(f"{f.path}: RoPE frequency factors (`rope_freqs`, Llama 3.1 scaling) are not "
                     "supported by the GGUF importer; convert the Hugging Face checkpoint instead")
  kind = f.arch_get("rope.scaling.type")
  if kind in (None, "none"):
    return {}
  if kind != "linear":
    raise ValueError(f"{f.path}: unsupported RoPE scaling {kind!r} (supported: none, linear)")
  return {"rope_type": "linear", "factor": float(f.arch_get("rope.scaling.factor", 1.0))}


def hf_config_from_gguf(f: GGUFFile) -> dict[str, Any]:
  """The transformers `config.json` dict that describes the file's model."""
  if f.arch not in _ARCHS:
    raise ValueError(f"{f.path}: unsupported GGUF architecture {f.arch!r}; supported: "
                     f"{sorted(_ARCHS)}")
  model_type, prefix = _ARCHS[f.arch]
  embed = int(f.arch_get("embedding_length"))
  heads = int(f.arch_get("attention.head_count"))
  layers = int(f.arch_get("block_count"))
  head_dim = int(f.arch_get("attention.key_length") or embed // heads)
  vocab = f.arch_get("vocab_size") or len(f.get("tokenizer.ggml.tokens") or []) or \
      f.tensors["token_embd.weight"].shape[-1]
  hf: dict[str, Any] = {
      "model_type": model_type, "architectures": [f"{prefix}ForCausalLM"],
      "vocab_size": int(vocab), "hidden_size": embed, "num_hidden_layers": layers,
      "intermediate_size": int(f.arch_get("feed_forward_length")),
      "num_attention_heads": heads,
      "num_key_value_heads": int(f.arch_get("attention.head_count_kv") or heads),
      "head_dim": head_dim, "rms_norm_eps": float(f.arch_get("attention.layer_norm_rms_epsilon")),
      "hidden_activation": "gelu_pytorch_tanh" if f.arch in _GEMMA else "silu",
      "tie_word_embeddings": "output.weight" not in f.tensors,
      "max_position_embeddings": int(f.arch_get("context_length", 8192)),
      "rope_theta": float(f.arch_get("rope.freq_base", 10_000.0)),
      "rope_scaling": _rope(f) or None,
      "bos_token_id": f.get("tokenizer.ggml.bos_token_id"),
      "eos_token_id": f.get("tokenizer.ggml.eos_token_id"),
      "pad_token_id": f.get("tokenizer.ggml.padding_token_id"),
  }
  if f.arch in ("gemma2", "gemma3"):
    hf["sliding_window"] = int(f.arch_get("attention.sliding_window", 4096))
    hf["query_pre_attn_scalar"] = _query_pre_attn_scalar(f, embed, heads, head_dim, layers)
    hf["attn_logit_softcapping"] = f.arch_get("attn_logit_softcapping")
    hf["final_logit_softcapping"] = f.arch_get("final_logit_softcapping")
  if f.arch == "gemma3":
    hf["rope_local_base_freq"] = float(f.arch_get("rope.freq_base_swa", 10_000.0))
    pattern = f.arch_get("attention.sliding_window_pattern", 6)
    if isinstance(pattern, list):  # per layer: True = sliding window
      hf["layer_types"] = ["sliding_attention" if p else "full_attention" for p in pattern]
    else:
      hf["sliding_window_pattern"] = int(pattern)
  return {k: v for k, v in hf.items() if v is not None}


def _gguf_name(hf_name: str, four_norms: bool) -> str:
  if hf_name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[hf_name]
  _, _, index, rest = hf_name.split(".", 3)  # model.layers.{i}.<rest>
  names = {**_LAYER_NAMES, **(_LAYER_NORMS_4 if four_norms else _LAYER_NORMS_2)}
  if rest not in names:
    raise KeyError(f"no GGUF name for {hf_name!r}")
  return f"blk.{index}.{names[rest]}"


def _unpermute_rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
  """Interleaved-pair rows (llama.cpp Llama Q/K) -> HF rotate-half rows, per head."""
  rows = w.shape[0]
  return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_tensor_getter(f: GGUFFile, cfg: ModelConfig):
  """`get(hf_name) -> np.ndarray` reading the matching GGUF tensor, conventions undone."""
  four_norms = f.arch in ("gemma2", "gemma3")

  def get(hf_name: str) -> np.ndarray:
    name = _gguf_name(hf_name, four_norms)
    w = f.tensor(name)
    if f.arch in _GEMMA and name.endswith("norm.weight"):
      w = w - 1.0
    if f.arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
      heads = cfg.num_heads if name.endswith("attn_q.weight") else cfg.num_kv_heads
      w = _unpermute_rope_rows(w, heads)
    return w

  return get


def load_gguf_checkpoint(path: str | os.PathLike, *, mesh: Mesh | None = None, rules: Any = None,
                         **config_overrides: Any) -> tuple[ModelConfig, api.Params]:
  """Loads a `.gguf` causal LM -> (cfg, params), dequantized to cfg.param_dtype.

  Args:
    path: the .gguf file (Gemma 1/2/3 or Llama/Mistral architecture).
    mesh, rules: place each tensor straight into its sharding (as `init_params` does).
    **config_overrides: ModelConfig fields for the returned cfg (`scan_layers=True`,
      `param_dtype="bfloat16"`, `dtype=...`).

  Raises:
    FileNotFoundError: no such file. ValueError: not a GGUF file or an unsupported model.
  """
  f = GGUFFile(path)
  scan = config_overrides.pop("scan_layers", False)
  cfg = hf_lib.config_from_hf(hf_config_from_gguf(f), **config_overrides)
  return hf_lib.params_from_hf_tensors(cfg, hf_tensor_getter(f, cfg), mesh=mesh, rules=rules,
                                       scan_layers=scan)


def sentencepiece_model_from_gguf(path: str | os.PathLike) -> bytes:
  """The serialized SentencePiece `ModelProto` of the vocabulary stored in a GGUF file.

  GGUF keeps SentencePiece vocabularies (`tokenizer.ggml.model == "llama"`) as pieces, scores
  and types. llama.cpp marks every special added token CONTROL with score -1000; the
  SentencePiece model keeps only BOS/EOS/PAD as CONTROL and the others (e.g. Gemma's
  `<start_of_turn>`) as USER_DEFINED pieces with score 0, which is restored here so that
  text containing them encodes as the original `tokenizer.model` does. A BPE model with
  byte fallback when the vocabulary has byte pieces, identity normalisation.

  Raises:
    ValueError: the file has no SentencePiece vocabulary (e.g. Llama 3's GPT-2-style BPE).
  """
  from sentencepiece import sentencepiece_model_pb2 as sp_pb2  # pylint: disable=g-import-not-at-top
  f = GGUFFile(path)
  kind = f.get("tokenizer.ggml.model")
  if kind != "llama":
    raise ValueError(f"{f.path}: tokenizer.ggml.model is {kind!r}, not a SentencePiece "
                     "vocabulary ('llama'); give data.tokenizer a tokenizer.model instead")
  pieces = f.get("tokenizer.ggml.tokens")
  scores = f.get("tokenizer.ggml.scores") or [0.0] * len(pieces)
  types = f.get("tokenizer.ggml.token_type") or [_NORMAL] * len(pieces)
  special = {k: f.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding", "unknown")}
  control_ids = {special[k] for k in ("bos", "eos", "padding") if special[k] is not None}
  m = sp_pb2.ModelProto()
  for i, (piece, score, kind_) in enumerate(zip(pieces, scores, types)):
    kind_ = int(kind_)
    if i == special["unknown"]:
      kind_ = _UNKNOWN
    elif kind_ in (_CONTROL, _USER_DEFINED, _UNKNOWN):
      kind_ = _CONTROL if i in control_ids else _USER_DEFINED
    if kind_ == _USER_DEFINED:  # HF added tokens spell spaces as " ", SentencePiece as "▁"
      piece = piece.replace(" ", "\u2581")
    m.pieces.add(piece=piece, score=float(score) if kind_ in (_NORMAL, _BYTE, _UNUSED) else 0.0,
                 type=kind_)
  t = m.trainer_spec
  t.model_type = sp_pb2.TrainerSpec.BPE
  t.vocab_size = len(pieces)
  t.byte_fallback = _BYTE in {int(k) for k in types}
  for field, key in (("bos_id", "bos"), ("eos_id", "eos"), ("pad_id", "padding"),
                     ("unk_id", "unknown")):
    setattr(t, field, -1 if special[key] is None else int(special[key]))
  for field, key in (("bos_piece", "bos"), ("eos_piece", "eos"), ("pad_piece", "padding"),
                     ("unk_piece", "unknown")):
    if special[key] is not None:
      setattr(t, field, pieces[int(special[key])])
  n = m.normalizer_spec
  charsmap = f.get("tokenizer.ggml.precompiled_charsmap")
  n.name = "identity" if not charsmap else "nmt_nfkc"
  if charsmap:
    n.precompiled_charsmap = bytes(charsmap)
  n.add_dummy_prefix = bool(f.get("tokenizer.ggml.add_space_prefix", True))
  n.remove_extra_whitespaces = bool(f.get("tokenizer.ggml.remove_extra_whitespaces", False))
  return m.SerializeToString()
