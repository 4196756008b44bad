"""Gemma-family decoders (Gemma 1/2/3, Llama 3, Mistral as configurations), reward heads,
checkpoint import/export and a KV-cache sampler. See docs/internals.md for the contracts."""
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
from prefjax.models.hf import config_from_hf, config_to_hf, load_hf_checkpoint, save_hf_checkpoint
from prefjax.models.config import PRESETS, ModelConfig, get_config
from prefjax.models.sampler import SampleOutput, sample
from prefjax.models.transformer import Transformer, attention_mask, init_cache

__all__ = [
    "PRESETS", "ModelConfig", "SampleOutput", "sample", "config_from_hf", "config_to_hf", "load_hf_checkpoint",
    "load_flax_gemma_checkpoint",
    "save_hf_checkpoint", "Transformer", "abstract_params", "attention_mask", "count_params",
    "forward", "forward_hidden", "get_config", "init_cache", "init_params", "logical_specs",
    "logits_from_hidden", "param_shardings", "reward_model_from_policy", "reward_scores",
    "stack_layers", "unembedding", "unstack_layers",
]
