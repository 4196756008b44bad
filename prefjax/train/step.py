"""The train step: one pure function, jitted once with explicit shardings.

`train_step(state, batch, *, task, tx, schedule, accum_steps, skip_nonfinite)`:
scan over `accum_steps` micro-batches summing gradients and `(sum, count)` statistics,
normalise, clip + AdamW, and refuse updates from a non-finite loss or gradient norm
(`updatable`; the parameters and optimizer state are kept as they were, `lax.cond`, and
`metrics["nonfinite"]` is 1; the loop stops or skips).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from prefjax import sharding as sharding_lib
from prefjax.models.kernels import CPU_SCHEDULERS, Kernels  # noqa: F401  (CPU_SCHEDULERS re-exported)
from prefjax.train.state import TrainState
from prefjax.train.tasks import Stats, Task

Batch = dict[str, jax.Array]


def split_micro(batch: Batch, accum_steps: int) -> Batch:
  """[B, ...] -> [A, B/A, ...], micro-batch a = rows a, a+A, ... (each stays on its shard)."""
  def split(x):
    b = x.shape[0]
    if b % accum_steps:
      raise ValueError(f"batch of {b} rows is not divisible by grad_accum_steps={accum_steps}")
    y = x.reshape((b // accum_steps, accum_steps) + x.shape[1:])
    y = jnp.swapaxes(y, 0, 1)
    spec = P(None, sharding_lib.BATCH_AXES, *([None] * (x.ndim - 1)))
    return jax.lax.with_sharding_constraint(y, spec) if _has_mesh() else y
  return jax.tree.map(split, batch)


def _has_mesh() -> bool:
  mesh = jax.sharding.get_abstract_mesh()
  return mesh is not None and not mesh.empty and all(
      a in mesh.axis_names for a in sharding_lib.BATCH_AXES)


def finalize_stats(stats: Stats) -> dict[str, jax.Array]:
  """`{name: (sum, count)}` -> `{name: sum / count}` (0 where the count is 0)."""
  return {k: s / jnp.maximum(n, 1e-9) * (n > 0) for k, (s, n) in stats.items()}


def accumulate_grads(loss_fn: Callable, params: Any, ref_params: Any, batch: Batch,
                     accum_steps: int) -> tuple[Any, Stats]:
  """Summed gradients of `loss_sum` and summed statistics over micro-batches."""
  grad_fn = jax.grad(loss_fn, has_aux=True)
  if accum_steps == 1:
    return grad_fn(params, ref_params, batch)
  micro = split_micro(batch, accum_steps)

  def body(carry, mb):
    g_acc, s_acc = carry
    g, s = grad_fn(params, ref_params, mb)
    return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, s_acc, s)), None

  first = jax.tree.map(lambda x: x[0], micro)
  g0, s0 = grad_fn(params, ref_params, first)
  rest = jax.tree.map(lambda x: x[1:], micro)
  (grads, stats), _ = jax.lax.scan(body, (g0, s0), rest)
  return grads, stats


# Gradient norms from half of sqrt(float32 max) (about 9.2e18) up are refused with the
# non-finite ones: a squared gradient could overflow Adam's second moment (an infinite moment
# freezes that parameter for good, and infinite moments make NaN updates).
MAX_GRAD_NORM = float(np.sqrt(np.finfo(np.float32).max)) / 2


def updatable(loss: jax.Array, grad_norm: jax.Array) -> jax.Array:
  """True (a bool scalar) where an update with this loss and gradient norm may be applied:
  both finite and the norm below `MAX_GRAD_NORM` (then AdamW's moments and update stay
  finite, clipped or not)."""
  return jnp.isfinite(loss) & (grad_norm < MAX_GRAD_NORM)  # NaN compares False


def train_step(state: TrainState, batch: Batch, *, task: Task,
               tx: optax.GradientTransformation, schedule: optax.Schedule,
               accum_steps: int = 1, skip_nonfinite: bool = False) -> tuple[TrainState, dict]:
  """One optimizer update; returns the new state and replicated scalar metrics."""
  del skip_nonfinite  # the step never applies a non-finite update; the loop decides
  rng, _ = jax.random.split(state.rng)
  grads, stats = accumulate_grads(task.loss_fn, state.params, state.ref_params, batch,
                                  accum_steps)
  n = jnp.maximum(stats["loss"][1], 1e-9)
  grads = jax.tree.map(lambda g: g / n.astype(g.dtype), grads)
  metrics = finalize_stats(stats)
  grad_norm = optax.global_norm(grads)
  finite = updatable(metrics["loss"], grad_norm)

  def update(operands):
    params, opt_state, grads = operands
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  # A conditional, not `where(finite, new, old)` over every leaf: the refused step costs
  # nothing and the applied one is AdamW's passes alone (three fewer passes over the
  # parameters and both moments; the optimizer part of a 46M-parameter step 97-130 -> 57-60 ms
  # on 2 CPU cores, docs/performance.md).
  params, opt_state = jax.lax.cond(finite, update, lambda operands: operands[:2],
                                   (state.params, state.opt_state, grads))
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
  metrics.update(grad_norm=grad_norm, lr=schedule(state.step),
                 nonfinite=1.0 - finite.astype(jnp.float32))
  return new_state, metrics


def eval_step(params: Any, ref_params: Any, batch: Batch, *, task: Task) -> Stats:
  """Summed statistics of one eval batch (no gradients)."""
  return task.eval_fn(params, ref_params, batch)


def batch_shardings(batch: Any, mesh: Mesh) -> Any:
  """Leading axis over (data, fsdp), the rest replicated, for every batch leaf."""
  return jax.tree.map(lambda x: sharding_lib.batch_sharding(mesh, len(x.shape)), batch)


def mesh_platform(mesh: Mesh) -> str:
  """Platform of the mesh's devices ("cpu", "tpu", "gpu"): what the step is compiled for
  (an AOT TPU topology mesh on a CPU host says "tpu")."""
  return mesh.devices.flat[0].platform


def compiler_options(kernels: Optional[Kernels] = None, num_devices: int = 1,
                     platform: Optional[str] = None) -> Optional[dict[str, str]]:
  """`jax.jit(compiler_options=...)` for the step functions; None off the CPU platform.

  `kernels.cpu_scheduler` (None kernels: the platform's defaults) picks XLA:CPU's instruction
  scheduler. On XLA:CPU the default (concurrency-optimised) scheduler starts independent ops
  early so they can run side by side, which keeps their buffers alive together: the 46M DPO
  step held 2.6 GB of temporaries. The memory-optimised scheduler orders for live memory
  instead; measured side by side (docs/performance.md) it lowered the step's
  peak RSS and did not slow it down.

  It is applied to single-device programs only: with several (simulated) CPU devices in one
  process, a memory-optimised step deadlocked in an all-gather rendezvous (XLA aborts after
  40 s: "Expected 8 threads to join the rendezvous, but only 3 of them arrived"; seen with 8
  fake devices on 2 cores in tests/train/test_iterative.py). TPU / GPU compilers are not
  given the option.

  Args:
    kernels: the run's `models.Kernels`.
    num_devices: devices of the program's mesh.
    platform: the mesh's platform (`mesh_platform`; None: `jax.default_backend()`).
  """
  platform = platform or jax.default_backend()
  if kernels is None:
    kernels = Kernels.for_platform(platform)
  kind = CPU_SCHEDULERS[kernels.cpu_scheduler]
  if kind is None or num_devices > 1 or platform != "cpu":
    return None
  return {"xla_cpu_scheduler_type": kind}


def jit_train_step(task: Task, tx: optax.GradientTransformation, schedule: optax.Schedule,
                   state_sh: TrainState, batch_sh: Any, mesh: Mesh, *,
                   accum_steps: int = 1, kernels: Optional[Kernels] = None) -> Callable:
  """`jax.jit(train_step)` with explicit shardings and the state donated.

  `kernels`: the ones `task` was built with (their `cpu_scheduler` sets the compiler options;
  None: the mesh platform's defaults)."""
  repl = NamedSharding(mesh, P())
  fn = functools.partial(train_step, task=task, tx=tx, schedule=schedule,
                         accum_steps=accum_steps)
  return jax.jit(fn, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, repl),
                 donate_argnums=0,
                 compiler_options=compiler_options(kernels, mesh.devices.size,
                                                   mesh_platform(mesh)))


def jit_eval_step(task: Task, param_sh: Any, ref_sh: Any, batch_sh: Any, mesh: Mesh, *,
                  kernels: Optional[Kernels] = None) -> Callable:
  """Jitted `eval_step` returning replicated `(sum, count)` statistics."""
  repl = NamedSharding(mesh, P())
  return jax.jit(functools.partial(eval_step, task=task),
                 in_shardings=(param_sh, ref_sh, batch_sh), out_shardings=repl,
                 compiler_options=compiler_options(kernels, mesh.devices.size,
                                                   mesh_platform(mesh)))
