"""Gemma-family decoders (Gemma 1/2/3, Llama 3, Mistral as configurations of one Linen code
path), reward heads, checkpoint import/export and a KV-cache sampler (docs/internals.md).

  cfg = models.get_config("gemma2_2b", dtype="bfloat16", remat="full", scan_layers=True)
  params = models.init_params(cfg, rng, mesh=mesh, rules=rules)    # sharded straight into place
  logits = models.forward(cfg, params, tokens)                     # [B,T,V] float32
  kernels = models.Kernels.for_platform("cpu", attention_key_tile=64)  # how it is computed
  logits = models.forward(cfg, params, tokens, kernels=kernels)    # (None: the backend's)
  hidden = models.forward_hidden(cfg, params, tokens, segment_ids=..., positions=...,
                                 branch_ids=...)                   # [B,T,D] cfg.dtype
  h_last = models.forward_hidden(cfg, params, tokens, readout=idx) # [B,n,D] at slots idx [B,n]
  w = models.unembedding(cfg, params)                              # [V,D]
  scores = models.reward_scores(rcfg, rparams, hidden)             # [B,T,R] float32
  rcfg, rparams = models.reward_model_from_policy(cfg, params, rng, num_reward_heads=1)
  cfg, params = models.load_hf_checkpoint(path, mesh=None)         # HF safetensors dir
  models.save_hf_checkpoint(cfg, params, path, max_shard_size="5GB")
  cfg, params = models.load_flax_gemma_checkpoint(path, "gemma_7b")  # official Orbax release
  cfg, params = models.load_gguf_checkpoint("model.gguf", mesh=mesh)  # llama.cpp file
  out = models.sample(cfg, params, prompts, lengths, rng, max_new_tokens=64, temperature=0.7,
                      top_p=0.95, stop_tokens=[eos])               # right-padded prompts

Params keep the official Flax Gemma names (`embedder/input_embedding`, `layer_{i}/attn/...`,
`final_norm/scale`); untied LMs add `lm_head/w` [V, D]; reward models `reward_head/{w,b}`.
With `scan_layers=True` the repeats of `attention_pattern` are stacked under `layers`
(`stack_layers` / `unstack_layers` convert); checkpoint I/O converts automatically.
"""
from prefjax.models.api import (
    abstract_params,
    count_params,
    forward,
    forward_hidden,
    init_params,
    logical_specs,
    logits_from_hidden,
    param_shardings,
    reward_model_from_policy,
    reward_scores,
    stack_layers,
    unembedding,
    unstack_layers,
)
from prefjax.models.flax_checkpoint import load_flax_gemma_checkpoint
from prefjax.models.gguf import load_gguf_checkpoint, sentencepiece_model_from_gguf
from prefjax.models.hf import config_from_hf, config_to_hf, load_hf_checkpoint, save_hf_checkpoint
from prefjax.models.config import PRESETS, ModelConfig, get_config
from prefjax.models.kernels import Kernels
from prefjax.models.sampler import SampleOutput, sample
from prefjax.models.transformer import Transformer, attention_mask, init_cache

__all__ = [
    "PRESETS", "Kernels", "ModelConfig", "SampleOutput", "sample", "config_from_hf", "config_to_hf", "load_hf_checkpoint",
    "load_flax_gemma_checkpoint", "load_gguf_checkpoint", "sentencepiece_model_from_gguf",
    "save_hf_checkpoint", "Transformer", "abstract_params", "attention_mask", "count_params",
    "forward", "forward_hidden", "get_config", "init_cache", "init_params", "logical_specs",
    "logits_from_hidden", "param_shardings", "reward_model_from_policy", "reward_scores",
    "stack_layers", "unembedding", "unstack_layers",
]
