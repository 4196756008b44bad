"""`task=export`: the trained policy / reward model of a workdir as a Hugging Face checkpoint.

The model is rebuilt from the workdir's recorded architecture (`config.json`'s
`resolved_model`, so a run initialised from an HF / GGUF / Flax checkpoint exports as that
model), restored from its newest intact checkpoint (or `export.step`), and written with
`models.save_hf_checkpoint`, together with the run's SentencePiece tokenizer
(`tokenizer.model` + `tokenizer_config.json`, loadable with `AutoTokenizer`). A LoRA run exports
the base with its adapters merged, and the adapters alone in PEFT format under `adapter/`.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax

from prefjax import models
from prefjax.train import builders


def export(config: Any, workdir: str) -> str:
  """Writes the HF checkpoint of `export.from_workdir` (default: `workdir`); returns its path."""
  src = config.export.get("from_workdir") or workdir
  out = config.export.get("output_dir") or os.path.join(workdir, "hf_export")
  trained_task = builders.source_task(
      src, "reward" if config.model.get("num_reward_heads") else "preference")
  mesh, rules = builders.make_mesh(config)
  cfg = builders.saved_model_config(src, config.model, task=trained_task)
  step = config.export.get("step")
  params, lora = builders.restore_workdir_params(src, cfg, mesh=mesh, rules=rules,
                                                 step=None if step is None else int(step))
  if jax.process_index() == 0:
    models.save_hf_checkpoint(cfg, jax.device_get(params), out)
    saved = builders.saved_run_config(src) or {}
    if lora is not None:
      from prefjax.models import lora as lora_lib  # pylint: disable=g-import-not-at-top
      lcfg, adapters = lora
      lora_lib.save_peft_adapters(
          cfg, jax.device_get(adapters), lcfg, os.path.join(out, "adapter"),
          base_model_name_or_path=str((saved.get("model") or {}).get("init") or ""))
    tokenizer = (saved.get("data") or {}).get("tokenizer") or config.data.get("tokenizer")
    if tokenizer:
      write_tokenizer(str(tokenizer), cfg, out)
  return out


def write_tokenizer(tokenizer: str, cfg: Any, out: str) -> Optional[str]:
  """`out/tokenizer.model` (the run's SentencePiece model; from a .gguf file its vocabulary)
  and a `tokenizer_config.json` naming the transformers class and the special tokens."""
  from prefjax import data  # pylint: disable=g-import-not-at-top
  tok = data.load_tokenizer(tokenizer)
  path = os.path.join(out, "tokenizer.model")
  with open(path, "wb") as f:
    f.write(tok._proto)  # pylint: disable=protected-access
  piece = lambda i: tok.sp.id_to_piece(int(i)) if 0 <= int(i) < tok.vocab_size else None  # noqa: E731
  from sentencepiece import sentencepiece_model_pb2 as sp_pb2  # pylint: disable=g-import-not-at-top
  proto = sp_pb2.ModelProto()
  proto.ParseFromString(tok._proto)  # pylint: disable=protected-access
  # transformers' SentencePiece classes differ in the leading-space rule: Llama's adds the
  # dummy prefix "▁" (Llama 2 / Mistral vocabularies), Gemma's does not (Gemma's).
  dummy_prefix = proto.normalizer_spec.add_dummy_prefix
  conf = {"tokenizer_class": "LlamaTokenizer" if dummy_prefix else "GemmaTokenizer",
          "bos_token": piece(tok.bos_id), "eos_token": piece(tok.eos_id),
          "pad_token": piece(tok.pad_id), "unk_token": piece(tok.sp.unk_id()),
          "add_bos_token": True, "add_eos_token": False,
          "model_max_length": int(cfg.max_position_embeddings)}
  with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump({k: v for k, v in conf.items() if v is not None}, f, indent=2)
  return path
