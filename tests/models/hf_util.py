"""Tiny random transformers models for parity tests (imported only when transformers is present)."""
from __future__ import annotations

import numpy as np

COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tiny_hf_config(family: str, *, num_labels: int = 0):
  """A tiny transformers config per family (Gemma 2: soft-caps + window 4 < sequence)."""
  import transformers as tf  # pylint: disable=g-import-not-at-top
  if family == "gemma":
    cfg = tf.GemmaConfig(**COMMON, num_hidden_layers=2, hidden_act="gelu_pytorch_tanh")
  elif family == "gemma2":
    cfg = tf.Gemma2Config(**COMMON, num_hidden_layers=2, sliding_window=4,
                          query_pre_attn_scalar=16, attn_logit_softcapping=5.0,
                          final_logit_softcapping=3.0)
  elif family == "gemma3":
    cfg = tf.Gemma3TextConfig(**COMMON, num_hidden_layers=3, sliding_window=4,
                              layer_types=["sliding_attention", "sliding_attention",
                                           "full_attention"],
                              rope_parameters={
                                  "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                     "rope_theta": 1_000_000.0},
                                  "sliding_attention": {"rope_type": "default",
                                                        "rope_theta": 10_000.0}})
  elif family == "llama":
    cfg = tf.LlamaConfig(**COMMON, num_hidden_layers=2, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500_000.0,
                                          "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 16})
  elif family == "mistral":
    cfg = tf.MistralConfig(**COMMON, num_hidden_layers=2, sliding_window=4,
                           tie_word_embeddings=False)
  else:
    raise ValueError(family)
  if num_labels:
    cfg.num_labels = num_labels
  return cfg


def build_hf_model(family: str, *, num_labels: int = 0, seed: int = 0):
  """Random tiny float32 model with non-trivial norm weights, eager attention."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers as tf  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  cfg = tiny_hf_config(family, num_labels=num_labels)
  cls = tf.AutoModelForSequenceClassification if num_labels else tf.AutoModelForCausalLM
  model = cls.from_config(cfg, attn_implementation="eager", dtype=torch.float32).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


def hf_logits(model, tokens: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    kw = {} if attention_mask is None else {"attention_mask": torch.tensor(attention_mask)}
    return model(input_ids=torch.tensor(tokens), **kw).logits.float().numpy()


def max_rel_diff(a: np.ndarray, b: np.ndarray) -> float:
  """max |a - b| / max |b| (relative to the logits' scale)."""
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))
