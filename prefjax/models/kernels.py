"""Kernel choices: how the model and the train step compute, chosen per platform.

`ModelConfig` says what a model is (what a checkpoint could hold); `Kernels` says how it is
computed on the machine at hand: which attention kernel, the XLA:CPU attention blockings, the
vocabulary head's log-prob implementation and XLA:CPU's instruction scheduler. None of it
changes a parameter name or shape; every choice computes the same numbers (to float tolerance).

  kernels = Kernels.for_platform("cpu")                         # the XLA:CPU-tuned defaults
  kernels = Kernels.for_platform("tpu", attention="xla")        # TPU defaults, one override
  logits = prefjax.models.forward(cfg, params, tokens, kernels=kernels)

The platform defaults live in `PLATFORM_DEFAULTS` (one row per platform). On TPU none of the
CPU kernels is traced unless asked for: Pallas splash attention for self-attention, no query
or causal blocks, no key windows, no CPU scheduler. `Kernels()` itself is the plain reference:
XLA attention with every query seeing all keys, the ops' default head, XLA's own scheduler.

The trainer resolves one `Kernels` per run from `config.kernels.*` (None = the platform's
default) and the platform of the mesh's devices (`prefjax.train.builders.kernels_from_config`),
and passes it to everything that runs the model.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

ATTENTION_KERNELS = ("xla", "splash")
# The vocabulary head's log-prob implementations (`prefjax.ops.logprobs.IMPLEMENTATIONS`;
# None: the ops default, custom_vjp).
LOGPS_IMPLEMENTATIONS = ("custom_vjp", "saved_logits", "checkpoint")
# `cpu_scheduler` -> XLA:CPU's `xla_cpu_scheduler_type` (None: XLA's default scheduler).
CPU_SCHEDULERS = {"memory_optimized": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
                  "concurrency_optimized": "CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED",
                  "xla_default": None}
PLATFORMS = ("cpu", "tpu", "gpu")
_PLATFORM_ALIASES = {"cuda": "gpu", "rocm": "gpu"}


@dataclasses.dataclass(frozen=True)
class Kernels:
  """Kernel choices (frozen and hashable: usable as a static jit argument / module attribute).

  Attributes:
    attention: "xla" (the jnp paths below) | "splash" (Pallas TPU splash attention,
      `prefjax.models.splash_attention`, for self-attention without a KV cache and without
      readout rows; every other attention call still takes the XLA paths).
    attention_query_block: queries longer than this keep no attention probabilities for the
      backward pass: causal self-attention saves its output and logsumexps and recomputes each
      block's probabilities (FlashAttention-2's backward); other attention is attended in query
      blocks of this many, each rematerialised. Either way the f32 [B, T, N, S] scores never
      exist whole (0: never). 256 on CPU: with scanned layers, T = 512 / 1024 steps ran 7% / 12%
      faster than saving the probabilities (the scan stacks them per layer) and T = 256 ran
      26% slower; unrolled layers ran as fast either way (`benchmarks/scaling.py`).
    attention_causal_block: self-attention without a KV cache splits its queries into blocks
      of this many slots, each attending only to the keys up to its last slot (exact under the
      causal mask; about half the score work at long lengths; 0: every query sees all S keys).
      256 on CPU.
    attention_key_tile: with causal blocks and queries longer than `attention_query_block`,
      each block also skips the keys before the first one its queries may see (packed rows:
      earlier segments), in windows of this many key slots chosen per row at run time
      (window_attention.py; exact). 0 (default): off. 64 on prompt-shared [4, 768] reward
      batches: attention about half the time, the step about 5% faster, and about 0.5-0.8 GiB
      more host memory while compiling (one switch branch per window width;
      docs/performance.md).
    logps_implementation: the vocabulary head's per-token log-probs
      (`prefjax.ops.token_logps_from_hidden`): "custom_vjp" | "saved_logits" | "checkpoint" |
      None (the ops default, custom_vjp). saved_logits keeps each chunk's logits for the
      backward pass: faster on CPU, more memory (docs/performance.md).
    cpu_scheduler: XLA:CPU's instruction scheduler for the step programs: "memory_optimized"
      (CPU default: lower peak memory, not slower; docs/performance.md) |
      "concurrency_optimized" | "xla_default" (no option given; every non-CPU default). Only
      applied to single-device CPU programs (`prefjax.train.step.compiler_options`).
  """

  attention: str = "xla"
  attention_query_block: int = 0
  attention_causal_block: int = 0
  attention_key_tile: int = 0
  logps_implementation: Optional[str] = None
  cpu_scheduler: str = "xla_default"

  def __post_init__(self):
    if self.attention not in ATTENTION_KERNELS:
      raise ValueError(f"kernels.attention={self.attention!r}; expected one of "
                       f"{' | '.join(ATTENTION_KERNELS)}")
    for name in ("attention_query_block", "attention_causal_block", "attention_key_tile"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"kernels.{name}={v!r} must be an int >= 0")
      if v < 0:
        raise ValueError(f"kernels.{name}={v} must be >= 0 (0: off)")
    if self.logps_implementation is not None and (
        self.logps_implementation not in LOGPS_IMPLEMENTATIONS):
      raise ValueError(f"kernels.logps_implementation={self.logps_implementation!r}; expected "
                       f"one of {' | '.join(LOGPS_IMPLEMENTATIONS)} (or None: custom_vjp)")
    if self.cpu_scheduler not in CPU_SCHEDULERS:
      raise ValueError(f"kernels.cpu_scheduler={self.cpu_scheduler!r}; expected one of "
                       f"{' | '.join(CPU_SCHEDULERS)}")

  @classmethod
  def for_platform(cls, platform: str, **overrides: Any) -> "Kernels":
    """The defaults of `platform` ("cpu" | "tpu" | "gpu"; "cuda" / "rocm" = "gpu") with
    `overrides` (field names; a value given here is used as is, None included)."""
    key = _PLATFORM_ALIASES.get(str(platform).lower(), str(platform).lower())
    if key not in PLATFORM_DEFAULTS:
      raise ValueError(f"unknown platform {platform!r}; expected one of {' | '.join(PLATFORMS)}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - names)
    if unknown:
      raise ValueError(f"unknown kernel options {unknown}; known: {sorted(names)}")
    return cls(**{**PLATFORM_DEFAULTS[key], **overrides})

  def replace(self, **overrides: Any) -> "Kernels":
    return dataclasses.replace(self, **overrides)

  def to_dict(self) -> dict[str, Any]:
    """Every field (JSON-ready), e.g. for a benchmark's record of what it ran."""
    return dataclasses.asdict(self)


PLATFORM_DEFAULTS: dict[str, dict[str, Any]] = {
    # XLA:CPU-tuned (docs/performance.md): query / causal blocks of 256, the memory-optimised
    # scheduler; key windows and the saved-logits head stay opt-in (more compile memory /
    # more step memory).
    "cpu": dict(attention="xla", attention_query_block=256, attention_causal_block=256,
                attention_key_tile=0, logps_implementation=None,
                cpu_scheduler="memory_optimized"),
    # No CPU kernel traced: splash attention, whole-row XLA attention elsewhere.
    "tpu": dict(attention="splash", attention_query_block=0, attention_causal_block=0,
                attention_key_tile=0, logps_implementation=None, cpu_scheduler="xla_default"),
    "gpu": dict(attention="xla", attention_query_block=0, attention_causal_block=0,
                attention_key_tile=0, logps_implementation=None, cpu_scheduler="xla_default"),
}


def default_kernels(kernels: Optional[Kernels] = None) -> Kernels:
  """`kernels`, or when None the defaults of the default JAX backend's platform."""
  if kernels is not None:
    if not isinstance(kernels, Kernels):
      raise TypeError(f"kernels must be a prefjax.models.Kernels, got {type(kernels).__name__}")
    return kernels
  import jax  # pylint: disable=import-outside-toplevel
  return Kernels.for_platform(jax.default_backend())
