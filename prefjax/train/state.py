"""The train state pytree, its shardings, and sharded initialisation.

`TrainState` holds arrays only. The model config, optimizer and loss are bound
into the step with `functools.partial`; reference parameters are a separate leaf
that the optimizer never sees.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


class TrainState(flax.struct.PyTreeNode):
  """Everything that changes during training (and is checkpointed).

  Attributes:
    step: int32 scalar, number of optimizer updates applied.
    params: trainable parameters (f32 master weights).
    opt_state: optax state for `params`.
    ref_params: frozen reference parameters (same shardings as `params`) or None.
    rng: raw uint32[2] PRNG key, split once per step.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  ref_params: Optional[Any]
  rng: jax.Array


def opt_state_shardings(tx: optax.GradientTransformation, abstract_params: Any,
                        param_sh: Any, mesh: Mesh) -> Any:
  """Shardings of `tx.init(params)`: param-shaped leaves follow the params, rest replicated."""
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  repl = NamedSharding(mesh, P())
  return optax.tree_map_params(
      tx, lambda _, sh: sh, abstract_opt, param_sh,
      transform_non_params=lambda _: repl,
      is_leaf=lambda x: isinstance(x, NamedSharding))


def state_shardings(tx: optax.GradientTransformation, abstract_params: Any, param_sh: Any,
                    mesh: Mesh, has_ref: bool, ref_sh: Any = None) -> TrainState:
  """A `TrainState` whose leaves are the `NamedSharding` of each state leaf.

  `ref_sh`: the reference params' shardings when they differ from the trainable params'
  (a LoRA run trains adapters; its reference is the base model).
  """
  repl = NamedSharding(mesh, P())
  return TrainState(
      step=repl, params=param_sh,
      opt_state=opt_state_shardings(tx, abstract_params, param_sh, mesh),
      ref_params=(param_sh if ref_sh is None else ref_sh) if has_ref else None, rng=repl)


def create_state(params: Any, tx: optax.GradientTransformation, state_sh: TrainState,
                 ref_params: Optional[Any], seed: int) -> TrainState:
  """Builds the initial state from (already sharded) params, sharding the optimizer state."""
  def build(params, ref_params):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ref_params=ref_params, rng=jax.random.PRNGKey(seed))
  in_sh = (state_sh.params, state_sh.ref_params)
  return jax.jit(build, in_shardings=in_sh, out_shardings=state_sh)(params, ref_params)


def abstract_state(tx: optax.GradientTransformation, abstract_params: Any,
                   state_sh: TrainState, has_ref: bool, abstract_ref: Any = None) -> TrainState:
  """`ShapeDtypeStruct` state carrying target shardings (the Orbax restore target).

  `abstract_ref`: the reference params when they are not shaped like the trainable ones.
  """
  def build(params, ref):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ref_params=(params if ref is None else ref) if has_ref else None,
                      rng=jax.random.PRNGKey(0))
  shapes = jax.eval_shape(build, abstract_params, abstract_ref)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, state_sh)


def param_count(params: Any) -> int:
  """Number of scalar parameters."""
  return sum(int(x.size) for x in jax.tree.leaves(params))


def cast_tree(tree: Any, fn: Callable[[jax.Array], jax.Array]) -> Any:
  return jax.tree.map(fn, tree)
