"""mixed_einsum / contract: float32 sums of bfloat16 operands, forward and backward.

References are independent of the code under test: float64 NumPy contractions of the same
(bfloat16-representable) values, and the dtypes of every dot in the traced program.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefjax.models import get_config, init_params
from prefjax.models.mixed_einsum import contract, mixed_einsum

EQUATIONS = [  # the model's projections, as in models.layers
    ("BTD,NDH->BTNH", (2, 5, 16), (3, 16, 8)),
    ("BSD,CKDH->CBSKH", (2, 5, 16), (2, 1, 16, 8)),
    ("BTD,SNDH->SBTNH", (2, 5, 16), (3, 2, 16, 8)),
    ("BTNH,NHD->BTD", (2, 5, 3, 8), (3, 8, 16)),
]


def _dots(jaxpr):
  """Every dot_general equation in a (closed) jaxpr, sub-jaxprs included."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      yield eqn
    for v in eqn.params.values():
      for sub in (v if isinstance(v, (tuple, list)) else (v,)):
        if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
          yield from _dots(sub)


def _bf16(key, shape):
  return jax.random.normal(key, shape, jnp.float32).astype(jnp.bfloat16)


@pytest.mark.parametrize("eqn,sa,sb", EQUATIONS)
def test_bfloat16_values_and_grads_match_float64(eqn, sa, sb):
  ka, kb, kg = jax.random.split(jax.random.PRNGKey(0), 3)
  a, b = _bf16(ka, sa), _bf16(kb, sb)
  out, vjp = jax.vjp(lambda a, b: mixed_einsum(eqn, a, b), a, b)
  g = _bf16(kg, out.shape)
  da, db = vjp(g)
  assert (out.dtype, da.dtype, db.dtype) == (jnp.bfloat16,) * 3
  a64, b64, g64 = (np.asarray(x, np.float64) for x in (a, b, g))
  want_out = np.einsum(eqn, a64, b64)
  # d/da sum(g * einsum(a, b)) and d/db, written out with NumPy (no JAX autodiff).
  ins, res = eqn.split("->")
  lhs, rhs = ins.split(",")
  want_da = np.einsum(f"{res},{rhs}->{lhs}", g64, b64)
  want_db = np.einsum(f"{lhs},{res}->{rhs}", a64, g64)
  for got, want in ((out, want_out), (da, want_da), (db, want_db)):
    # One bfloat16 rounding of a float32 sum: within 2^-8 relative (plus a tiny floor).
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2 ** -8, atol=1e-6)


def test_bfloat16_dots_accumulate_in_float32_in_the_backward_pass_too():
  a, b = _bf16(jax.random.PRNGKey(1), (4, 6, 16)), _bf16(jax.random.PRNGKey(2), (3, 16, 8))
  loss = lambda a, b: mixed_einsum("BTD,NDH->BTNH", a, b).astype(jnp.float32).sum()
  dots = list(_dots(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(a, b)))
  assert len(dots) == 3  # forward, d a, d b
  for eqn in dots:
    assert [v.aval.dtype for v in eqn.invars] == [jnp.bfloat16, jnp.bfloat16], eqn
    assert eqn.outvars[0].aval.dtype == jnp.float32, eqn


def test_float32_is_plain_einsum():
  a = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 16))
  b = jax.random.normal(jax.random.PRNGKey(1), (3, 16, 8))
  eqn = "BTD,NDH->BTNH"
  np.testing.assert_array_equal(mixed_einsum(eqn, a, b), jnp.einsum(eqn, a, b))
  np.testing.assert_array_equal(contract(eqn, a, b), jnp.einsum(eqn, a, b))
  jaxpr = jax.make_jaxpr(lambda a, b: mixed_einsum(eqn, a, b))(a, b)
  assert "custom_vjp" not in str(jaxpr)


@pytest.mark.parametrize("eqn,sa,sb", [
    ("...D,DF->...F", (2, 3, 16), (16, 8)),   # ellipsis
    ("BTD,BTD->BT", (2, 3, 16), (2, 3, 16)),  # fine: every index is in the other operand
    ("BTD,DF->BF", (2, 3, 16), (16, 8)),      # T summed inside one operand alone
])
def test_other_equations_still_differentiate(eqn, sa, sb):
  a, b = _bf16(jax.random.PRNGKey(0), sa), _bf16(jax.random.PRNGKey(1), sb)
  loss = lambda a, b: mixed_einsum(eqn, a, b).astype(jnp.float32).sum()
  want = jax.grad(lambda a, b: jnp.einsum(eqn, a, b).sum(), argnums=(0, 1))(
      a.astype(jnp.float32), b.astype(jnp.float32))
  got = jax.grad(loss, argnums=(0, 1))(a, b)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g, np.float32), w, rtol=2e-2, atol=2e-2)


def test_contract_rounds_to_the_requested_dtype():
  a, b = _bf16(jax.random.PRNGKey(0), (4, 16)), _bf16(jax.random.PRNGKey(1), (16, 8))
  assert contract("MD,DF->MF", a, b).dtype == jnp.bfloat16
  out = contract("MD,DF->MF", a, b, jnp.float32)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, np.asarray(a, np.float64) @ np.asarray(b, np.float64),
                             rtol=1e-5, atol=1e-5)


def test_bfloat16_model_gradient_has_no_bfloat16_accumulating_dot():
  """Every matmul of a bfloat16 model's loss gradient (trunk, attention, MLP and LM head)
  multiplies bfloat16 operands into a float32 result: the fast AMX/MXU path."""
  from prefjax.train import tasks  # pylint: disable=g-import-not-at-top
  cfg = get_config("tiny_gemma", dtype="bfloat16")
  params = init_params(cfg, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, cfg.vocab_size)
  rows = {"tokens": tokens, "positions": jnp.broadcast_to(jnp.arange(12), (2, 12)),
          "segment_ids": jnp.ones((2, 12), jnp.int32)}

  def loss(p):
    h = tasks.forward(cfg, p, rows)
    return tasks.token_logps(cfg, p, h, jnp.roll(tokens, -1, axis=1), 4).sum()

  dots = list(_dots(jax.make_jaxpr(jax.grad(loss))(params)))
  assert len(dots) > 10
  low = [e for e in dots if any(v.aval.dtype == jnp.bfloat16 for v in e.invars)]
  assert low, "the bfloat16 model ran no bfloat16 matmul"
  bad = [str(e)[:200] for e in low if e.outvars[0].aval.dtype != jnp.float32
         or any(v.aval.dtype != jnp.bfloat16 for v in e.invars)]
  assert not bad, "\n".join(bad)
