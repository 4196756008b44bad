"""Train step: sharded == single device, gradient accumulation, compile once, DPO learns."""
import jax
import numpy as np
import pytest

from tests.train import helpers


def _close_trees(a, b, rtol, atol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_sharded_2x2x2_equals_single_device():
  batches = [helpers.pair_batch(8, seed=s) for s in range(2)]
  one, p1 = helpers.run_steps(helpers.mesh_of(1), batches)
  mesh8 = helpers.mesh_of(8, {"data": 2, "fsdp": 2, "tensor": 2})
  eight, p8 = helpers.run_steps(mesh8, batches)
  for a, b in zip(one, eight):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-4, atol=1e-6)
  _close_trees(p1, p8, rtol=1e-4, atol=1e-6)


def test_grad_accumulation_equals_full_batch():
  batches = [helpers.pair_batch(8, seed=s) for s in range(2)]
  mesh = helpers.mesh_of(2)
  full, pf = helpers.run_steps(mesh, batches, accum=1)
  acc, pa = helpers.run_steps(mesh, batches, accum=2)
  for a, b in zip(full, acc):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a["rewards/accuracies"], b["rewards/accuracies"], atol=1e-6)
  _close_trees(pf, pa, rtol=1e-4, atol=1e-6)


def test_compiles_once():
  import flax.linen as nn
  from prefjax import sharding as sharding_lib
  mesh = helpers.mesh_of(8)
  with jax.set_mesh(mesh), nn.logical_axis_rules(list(sharding_lib.LOGICAL_AXIS_RULES)):
    state, fn = helpers.setup(mesh)
    for s in range(3):
      state, _ = fn(state, sharding_lib.make_global_batch(helpers.pair_batch(8, seed=s), mesh))
    assert fn._cache_size() == 1  # pylint: disable=protected-access


def test_dpo_loss_finite_and_falling():
  batch = helpers.pair_batch(8, seed=0)
  ms, _ = helpers.run_steps(helpers.mesh_of(1), [batch] * 8, lr=3e-3)
  losses = [m["loss"] for m in ms]
  assert all(np.isfinite(losses))
  assert losses[0] == pytest.approx(np.log(2), abs=1e-5)  # policy == reference at step 0
  assert losses[-1] < losses[0] - 0.05
  assert ms[-1]["rewards/accuracies"] > 0.5


@pytest.mark.parametrize("task,loss", [("reward", "bradley_terry"), ("preference", "simpo")])
def test_reference_free_tasks_learn(task, loss):
  batch = helpers.pair_batch(8, seed=1)
  ms, _ = helpers.run_steps(helpers.mesh_of(1), [batch] * 6, task=task, loss_name=loss,
                            ref_mode="none", lr=3e-3)
  assert np.isfinite(ms[-1]["loss"]) and ms[-1]["loss"] < ms[0]["loss"]


def test_cpu_scheduler_choice_keeps_the_numbers():
  """XLA:CPU's memory-optimised scheduler (the default) and its concurrency-optimised one
  order the same computation differently: same losses and parameters."""
  batches = [helpers.pair_batch(8, seed=s) for s in range(2)]
  mem, pm = helpers.run_steps(helpers.mesh_of(1), batches, cpu_scheduler="memory_optimized")
  conc, pc = helpers.run_steps(helpers.mesh_of(1), batches,
                               cpu_scheduler="concurrency_optimized")
  for a, b in zip(mem, conc):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5, atol=1e-6)
  _close_trees(pm, pc, rtol=1e-4, atol=1e-6)


def test_cpu_scheduler_reaches_the_compiler(monkeypatch):
  """The kernels' option is passed to XLA:CPU: an enum value XLA does not know fails the
  compilation; other platforms never get it."""
  from prefjax.models import Kernels
  from prefjax.train import step as step_lib
  cpu = Kernels.for_platform("cpu")
  assert step_lib.compiler_options(cpu, platform="cpu") == {
      "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
  assert step_lib.compiler_options(None, platform="cpu") == step_lib.compiler_options(
      cpu, platform="cpu")  # None: the platform's defaults
  assert step_lib.compiler_options(cpu.replace(cpu_scheduler="xla_default"),
                                   platform="cpu") is None
  # Several devices in one process: never (an all-gather rendezvous deadlocked with it).
  assert step_lib.compiler_options(cpu, num_devices=8, platform="cpu") is None
  # Off CPU (e.g. an AOT compile for a TPU mesh on a CPU host): never, whatever the kernels.
  assert step_lib.compiler_options(None, platform="tpu") is None
  assert step_lib.compiler_options(cpu, platform="tpu") is None
  with pytest.raises(ValueError, match="kernels.cpu_scheduler='fastest'"):
    cpu.replace(cpu_scheduler="fastest")
  monkeypatch.setitem(step_lib.CPU_SCHEDULERS, "memory_optimized", "NOT_A_SCHEDULER")
  with pytest.raises(Exception, match="NOT_A_SCHEDULER"):
    helpers.run_steps(helpers.mesh_of(1), [helpers.pair_batch(8, seed=0)])


def test_reward_task_sharded_2x2x2_equals_single_device():
  """The reward task reads its scores through `forward_hidden(readout=...)` (the last layer
  only at the scored slots); sharded over data x fsdp x tensor it matches one device."""
  batches = [helpers.pair_batch(8, seed=s) for s in range(2)]
  one, p1 = helpers.run_steps(helpers.mesh_of(1), batches, task="reward",
                              loss_name="bradley_terry", ref_mode="none")
  mesh8 = helpers.mesh_of(8, {"data": 2, "fsdp": 2, "tensor": 2})
  eight, p8 = helpers.run_steps(mesh8, batches, task="reward", loss_name="bradley_terry",
                                ref_mode="none")
  for a, b in zip(one, eight):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-4, atol=1e-6)
  # Adam at lr 1e-2 divides near-zero gradients by their own size, so reduction-order noise
  # (one device vs 2x2x2, and a different XLA:CPU scheduler on one device) moves a few such
  # parameters by up to ~1e-4; every other parameter agrees to 1e-6.
  _close_trees(p1, p8, rtol=1e-4, atol=1e-4)


def _one_step(batch, mesh):
  """(state before, state after, metrics) of one jitted step on `batch`, all on the host."""
  import flax.linen as nn
  from prefjax import sharding as sharding_lib
  with jax.set_mesh(mesh), nn.logical_axis_rules(list(sharding_lib.LOGICAL_AXIS_RULES)):
    state, fn = helpers.setup(mesh)
    before = jax.device_get(state)
    after, m = fn(state, sharding_lib.make_global_batch(batch, mesh))
    return before, jax.device_get(after), jax.device_get(m)


def test_nonfinite_step_keeps_parameters_and_moments():
  """A NaN loss: the update is refused (params and both Adam moments bitwise as before), the
  step counter moves on and the metrics say so."""
  batch = helpers.pair_batch(8, seed=3)
  batch["loss_mask"] = batch["loss_mask"].copy()
  batch["loss_mask"][0, 0, 5] = np.nan
  before, after, m = _one_step(batch, helpers.mesh_of(2))
  assert float(m["nonfinite"]) == 1.0 and not np.isfinite(float(m["loss"]))
  assert int(after.step) == int(before.step) + 1
  for x, y in zip(jax.tree.leaves((before.params, before.opt_state)),
                  jax.tree.leaves((after.params, after.opt_state))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_finite_step_is_clip_plus_adamw():
  """The applied update equals optax's clip + AdamW on the normalised gradients, computed here
  without the step (independent of its conditional)."""
  import optax
  from prefjax.train import optimizer as optim_lib, tasks as tasks_lib
  import ml_collections
  batch = helpers.pair_batch(8, seed=4)
  before, after, m = _one_step(batch, helpers.mesh_of(1))
  assert float(m["nonfinite"]) == 0.0
  cfg = helpers.model_cfg("preference")
  task = tasks_lib.make_task("preference", model_cfg=cfg, layout="padded",
                             loss_config=ml_collections.ConfigDict({"name": "dpo", "beta": 0.1}),
                             ref_mode="model", chunk_size=8)
  (_, stats), grads = jax.value_and_grad(task.loss_fn, has_aux=True)(
      before.params, before.ref_params, jax.tree.map(np.asarray, batch))
  n = stats["loss"][1]
  grads = jax.tree.map(lambda g: g / n, grads)
  tx, _ = optim_lib.make_optimizer(helpers.optim_config(), 100)
  updates, opt = tx.update(grads, before.opt_state, before.params)
  # The first AdamW step moves every parameter by about lr (1e-2) times sign(g): a tolerance of
  # 1% of that absorbs the gradients' summation order, and a missing update fails.
  moved = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
              for a, b in zip(jax.tree.leaves(after.params), jax.tree.leaves(before.params)))
  assert moved > 5e-3
  _close_trees(optax.apply_updates(before.params, updates), after.params, rtol=0, atol=1e-4)
  _close_trees(opt, after.opt_state, rtol=1e-3, atol=1e-9)


def test_updatable_refuses_nan_inf_and_overflowing_norms():
  import jax.numpy as jnp
  from prefjax.train.step import MAX_GRAD_NORM, updatable
  ok = lambda loss, norm: bool(updatable(jnp.float32(loss), jnp.float32(norm)))
  assert ok(0.7, 3.0) and ok(0.7, 1e18)
  assert not ok(np.nan, 1.0) and not ok(np.inf, 1.0)
  assert not ok(0.7, np.nan) and not ok(0.7, np.inf) and not ok(0.7, 2 * MAX_GRAD_NORM)
  assert float(jnp.float32(MAX_GRAD_NORM)) ** 2 < float(np.finfo(np.float32).max)
