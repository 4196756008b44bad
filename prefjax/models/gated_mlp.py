"""Gated MLP (GeGLU / SwiGLU) with a hand-written backward pass.

  y = (act(x @ W_gate[0]) * (x @ W_gate[1])) @ W_out        (Shazeer 2020, "GLU Variants
                                                            Improve Transformer")

Why not autodiff: differentiating the einsums lets XLA:CPU fuse the activation's backward
with a transpose of the [B·T, F] gradient (to feed the weight-gradient matmul), a strided
write that on a 2-core CPU cost more than all the MLP matmuls together (traced with
`benchmarks/train_step.py --profile-dir`, `benchmarks/profile_summary.py`). Here every weight gradient is an
explicit `[M, D]^T @ [M, F]` contraction over the flattened tokens, which XLA hands to the
matmul library with a transposed-operand flag instead of materialising a transpose: the MLP
forward+backward ran 2.1x faster (f32, B·T = 4096, D = 512, F = 2048). The residuals are
what autodiff keeps (x and the two pre-activations), so memory is unchanged.

Shapes: x [B, T, D]; w_gate [2, D, F] (or [2, F, D] when `transposed`, the Gemma 3 layout);
w_out [F, D]; returns [B, T, D]. Gradients are exact (tests/models/test_gated_mlp.py compares
them with autodiff of the plain formula).
"""
from __future__ import annotations

import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from prefjax.models.mixed_einsum import contract


def _act(name: str):
  if name == "gelu":
    return functools.partial(jax.nn.gelu, approximate=True)
  if name == "silu":
    return jax.nn.silu
  raise ValueError(f"activation={name!r}; expected 'gelu' or 'silu'")


def _constrain(x: jax.Array, axes: Optional[tuple]) -> jax.Array:
  return x if axes is None else nn.with_logical_constraint(x, axes)


def _gate_w(w_gate: jax.Array, i: int, transposed: bool) -> jax.Array:
  """[D, F] slice i of the stacked gating weight."""
  return w_gate[i].T if transposed else w_gate[i]


def gated_mlp_reference(x, w_gate, w_out, activation="gelu", transposed=False,
                        hidden_axes=None):
  """The same forward pass differentiated by autodiff; the oracle for `gated_mlp`'s backward."""
  return _fwd(x, w_gate, w_out, activation, transposed, hidden_axes)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def gated_mlp(x: jax.Array, w_gate: jax.Array, w_out: jax.Array, activation: str = "gelu",
              transposed: bool = False, hidden_axes: Optional[tuple] = None) -> jax.Array:
  """x [B, T, D] -> [B, T, D]; see the module docstring."""
  return _fwd(x, w_gate, w_out, activation, transposed, hidden_axes)[0]


def _fwd(x, w_gate, w_out, activation, transposed, hidden_axes):
  g0 = contract("BTD,DF->BTF", x, _gate_w(w_gate, 0, transposed))
  g1 = contract("BTD,DF->BTF", x, _gate_w(w_gate, 1, transposed))
  hidden = _constrain(_act(activation)(g0) * g1, hidden_axes)
  y = contract("BTF,FD->BTD", hidden, w_out)
  return y, (x, w_gate, w_out, g0, g1)


def _bwd(activation, transposed, hidden_axes, res, dy):
  x, w_gate, w_out, g0, g1 = res
  d, f = x.shape[-1], g0.shape[-1]
  a, act_vjp = jax.vjp(_act(activation), g0)
  hidden = a * g1
  dy2 = dy.reshape(-1, d)
  d_out = contract("MF,MD->FD", hidden.reshape(-1, f), dy2, w_out.dtype)
  dh = _constrain(contract("BTD,FD->BTF", dy, w_out), hidden_axes)
  dg1 = dh * a
  (dg0,) = act_vjp(dh * g1)
  x2 = x.reshape(-1, d)
  if transposed:  # [2, F, D]
    dw = [contract("MF,MD->FD", dg.reshape(-1, f), x2) for dg in (dg0, dg1)]
  else:           # [2, D, F]
    dw = [contract("MD,MF->DF", x2, dg.reshape(-1, f)) for dg in (dg0, dg1)]
  d_gate = jnp.stack(dw).astype(w_gate.dtype)
  acc = jnp.result_type(dg0, jnp.float32)  # the two halves of dx summed before rounding
  dx = (contract("BTF,DF->BTD", dg0, _gate_w(w_gate, 0, transposed), acc)
        + contract("BTF,DF->BTD", dg1, _gate_w(w_gate, 1, transposed), acc))
  return dx.astype(x.dtype), d_gate, d_out


gated_mlp.defvjp(_fwd, _bwd)
