"""Batched autoregressive sampling with an explicit KV-cache pytree (Gemma `sampler.py` style).

Prompts come in right-padded (`prompt_tokens [B, P]`, `prompt_lengths [B]`) and are
left-aligned internally so that every row writes its next token into the same cache slot:
row b occupies slots `P - len_b ... P - 1` (segment 1) with positions `0 ... len_b - 1`; pad
slots have segment 0 and are never attended to. Decoding then appends one slot per step
(`cache["index"]`), with position `len_b + step`. One prefill call, then a jitted
`lax.while_loop` that stops at `max_new_tokens` or when every row has emitted a stop token.

Decoding rules: temperature 0 = greedy (argmax); otherwise logits / temperature, then top-k
(k > 0) and nucleus top-p (< 1; Holtzman et al. 2020) filtering, then a categorical draw.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from prefjax.models.api import Params, logits_from_hidden
from prefjax.models.config import ModelConfig
from prefjax.models.kernels import Kernels, default_kernels
from prefjax.models.transformer import Transformer, init_cache


class SampleOutput(NamedTuple):
  tokens: jax.Array  # [B, max_new_tokens] generated tokens; `pad_id` after a row is done
  lengths: jax.Array  # [B] generated tokens per row (a final stop token included)
  done: jax.Array  # [B] bool: the row emitted a stop token


def filter_logits(logits: jax.Array, *, temperature: float, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
  """Temperature, top-k and top-p over logits [B, V] (float32); filtered entries -> -inf."""
  logits = logits.astype(jnp.float32) / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each sorted token
    keep = before < top_p
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return logits


def choose(logits: jax.Array, rng: jax.Array, *, temperature: float, top_k: int,
           top_p: float) -> jax.Array:
  """Next tokens [B] from logits [B, V]."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  filtered = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
  return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)


def left_align(prompt_tokens: jax.Array,
               prompt_lengths: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Right-padded [B, P] prompts -> left-padded tokens, segment ids (0 pad) and positions."""
  b, p = prompt_tokens.shape
  shift = p - prompt_lengths  # [B]
  src = jnp.arange(p)[None, :] - shift[:, None]  # slot -> source index
  valid = src >= 0
  tokens = jnp.where(valid, jnp.take_along_axis(prompt_tokens, jnp.maximum(src, 0), 1), 0)
  return tokens.astype(jnp.int32), valid.astype(jnp.int32), jnp.maximum(src, 0).astype(jnp.int32)


def _step_logits(cfg: ModelConfig, params: Params, tokens: jax.Array, positions: jax.Array,
                 segments: jax.Array, cache: Any, kernels: Kernels | None = None
                 ) -> tuple[jax.Array, Any]:
  """Runs `tokens [B, T]` through the cached decoder; returns last-slot logits [B, V]."""
  hidden, cache = Transformer(cfg, kernels).apply({"params": params}, tokens, positions, segments,
                                         cache=cache)
  return logits_from_hidden(cfg, params, hidden[:, -1:])[:, 0], cache


def sample(cfg: ModelConfig, params: Params, prompt_tokens: Any, prompt_lengths: Any,
           rng: Any = 0, *, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
           top_p: float = 1.0, stop_tokens: Any = (), pad_id: int = 0,
           kernels: Kernels | None = None) -> SampleOutput:
  """Generates up to `max_new_tokens` per row (jitted; compiles once per static setting).

  Args:
    cfg, params: the model.
    prompt_tokens: [B, P] int, right-padded; prompt_lengths: [B] int (>= 1).
    rng: PRNG key or int seed (unused when greedy).
    temperature: 0 = greedy. top_k: 0 = off. top_p: 1 = off.
    stop_tokens: token ids; a row is done after emitting one (it is kept in the output).
    kernels: how attention is computed (None: the default backend's `Kernels.for_platform`;
      cached attention always takes the XLA path).
  Returns:
    SampleOutput(tokens [B, max_new_tokens], lengths [B], done [B]).
  """
  rng = jax.random.key(rng) if isinstance(rng, int) else rng
  stops = jnp.asarray(tuple(stop_tokens) or (-1,), jnp.int32).reshape(-1)
  return _sample(cfg, params, jnp.asarray(prompt_tokens, jnp.int32),
                 jnp.asarray(prompt_lengths, jnp.int32), rng, stops,
                 max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=int(top_k),
                 top_p=float(top_p), pad_id=int(pad_id), kernels=default_kernels(kernels))


@functools.partial(jax.jit, static_argnames=(
    "cfg", "max_new_tokens", "temperature", "top_k", "top_p", "pad_id", "kernels"))
def _sample(cfg: ModelConfig, params: Params, prompt_tokens: jax.Array,
            prompt_lengths: jax.Array, rng: jax.Array, stops: jax.Array, *,
            max_new_tokens: int, temperature: float, top_k: int, top_p: float,
            pad_id: int, kernels: Kernels) -> SampleOutput:
  """Prefill + `lax.while_loop` decode (see `sample`)."""
  b, p = prompt_tokens.shape
  tokens, segments, positions = left_align(prompt_tokens, prompt_lengths)
  cache = init_cache(cfg, b, p + max_new_tokens)
  logits, cache = _step_logits(cfg, params, tokens, positions, segments, cache, kernels)
  pick = functools.partial(choose, temperature=temperature, top_k=top_k, top_p=top_p)

  def cond(state):
    step, _, _, _, done, _, _ = state
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(state):
    step, cache, logits, out, done, lengths, rng = state
    rng, sub = jax.random.split(rng)
    nxt = jnp.where(done, pad_id, pick(logits, sub))
    out = out.at[:, step].set(nxt)
    lengths = lengths + (~done).astype(jnp.int32)
    done = done | jnp.isin(nxt, stops)
    pos = (prompt_lengths + step)[:, None]
    logits, cache = _step_logits(cfg, params, nxt[:, None], pos, jnp.ones((b, 1), jnp.int32),
                                 cache, kernels)
    return step + 1, cache, logits, out, done, lengths, rng

  out = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
  state = (jnp.int32(0), cache, logits, out, jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32),
           rng)
  _, _, _, out, done, lengths, _ = jax.lax.while_loop(cond, body, state)
  return SampleOutput(out, lengths, done)
