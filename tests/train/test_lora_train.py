"""LoRA training: the DPO gradient of the adapters is the chain rule of the full-parameter DPO
gradient, the base stays frozen as the reference, and the run's programs compile."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from prefjax import models
from prefjax import sharding as sharding_lib
from prefjax.models import lora
from prefjax.train import tasks as tasks_lib
from tests.train import helpers


def test_lora_dpo_gradient_is_the_full_gradient_through_the_adapters():
  cfg = helpers.model_cfg()
  base = models.init_params(cfg, 0)
  loss_cfg = ml_collections.ConfigDict({"name": "dpo", "beta": 0.1})
  full = tasks_lib.make_task("preference", model_cfg=cfg, layout="padded", loss_config=loss_cfg,
                             ref_mode="model", chunk_size=8)
  lcfg = lora.LoraConfig(rank=2, alpha=4.0, targets=("q", "down"))
  adapters = lora.init_adapters(cfg, base, lcfg, jax.random.key(1))
  # Non-zero B so that the policy differs from the reference and dL/dA is non-zero.
  rng = np.random.default_rng(0)
  for i in range(cfg.num_layers):
    for t in lcfg.targets:
      key = ("attn", "q_einsum", "w") if t == "q" else ("mlp", "linear")
      node = adapters[f"layer_{i}"]
      for k in key:
        node = node[k]
      node[t]["b"] = jnp.asarray(rng.normal(0, 0.2, node[t]["b"].shape), jnp.float32)
  task = tasks_lib.with_lora(full, lcfg, cfg)
  batch = {k: jnp.asarray(v) for k, v in helpers.pair_batch(b=4).items()}
  trainable = lora.trainable_from(base, adapters)

  g_lora, _ = jax.jit(jax.grad(task.loss_fn, has_aux=True))(trainable, base, batch)
  merged = lora.merge(base, adapters, lcfg, cfg)
  # The full task with the merged policy and the base as reference, differentiated in the
  # policy only.
  g_full, _ = jax.jit(jax.grad(full.loss_fn, has_aux=True))(merged, base, batch)
  s = lcfg.scale
  for i in range(cfg.num_layers):
    gq = g_full[f"layer_{i}"]["attn"]["q_einsum"]["w"]         # [N, D, H]
    ad = adapters[f"layer_{i}"]["attn"]["q_einsum"]["w"]["q"]
    got = g_lora["lora"][f"layer_{i}"]["attn"]["q_einsum"]["w"]["q"]
    np.testing.assert_allclose(got["b"], s * jnp.einsum("dr,ndh->rnh", ad["a"], gq),
                               rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(got["a"], s * jnp.einsum("ndh,rnh->dr", gq, ad["b"]),
                               rtol=2e-4, atol=1e-6)
    gd = g_full[f"layer_{i}"]["mlp"]["linear"]                  # [F, D]
    ad = adapters[f"layer_{i}"]["mlp"]["linear"]["down"]
    got = g_lora["lora"][f"layer_{i}"]["mlp"]["linear"]["down"]
    np.testing.assert_allclose(got["b"], s * ad["a"].T @ gd, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(got["a"], s * gd @ ad["b"].T, rtol=2e-4, atol=1e-6)


def test_lora_programs_train_adapters_only_and_keep_the_base():
  from configs import quickstart  # pylint: disable=g-import-not-at-top
  from prefjax.train import program as program_lib  # pylint: disable=g-import-not-at-top
  from prefjax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  from prefjax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  c = quickstart.get_config("runlocal")
  c.model.vocab_size = helpers.VOCAB
  c.model.lora.rank = 4
  c.model.lora.targets = "q,v,gate"
  c.reference.mode = "model"
  c.optim.learning_rate = 1e-2
  mesh = helpers.mesh_of(8, {"data": 2, "fsdp": 4})
  rules = sharding_lib.LOGICAL_AXIS_RULES
  cfg = helpers.model_cfg()
  with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
    p = program_lib.build(c, mesh, rules, cfg, 10)
    assert p.lora == lora.LoraConfig(4, 8.0, ("q", "v", "gate")) and p.has_ref_params
    base = models.init_params(cfg, 0, mesh=mesh, rules=rules)
    trainable = p.initial_trainable(base, 0)
    state = state_lib.create_state(trainable, p.tx, p.state_sh, base, 0)
    abstract = p.abstract_state()
    assert jax.tree.structure(abstract) == jax.tree.structure(state)
    batch = sharding_lib.make_global_batch(helpers.pair_batch(), mesh)
    step = p.train_step(step_lib.batch_shardings(batch, mesh))
    base_host = jax.device_get(base)
    losses = []
    for _ in range(3):
      state, m = step(state, batch)
      losses.append(float(m["loss"]))
    assert losses[0] == np.float32(np.log(2)) or abs(losses[0] - np.log(2)) < 1e-5
    assert losses[-1] < losses[0]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.ref_params), base_host)
    merged = jax.device_get(p.policy_params(state))
    delta = merged["layer_0"]["attn"]["q_einsum"]["w"] - base_host["layer_0"]["attn"]["q_einsum"]["w"]
    assert np.abs(delta).max() > 0
    np.testing.assert_array_equal(merged["layer_0"]["attn"]["attn_vec_einsum"]["w"],
                                  base_host["layer_0"]["attn"]["attn_vec_einsum"]["w"])
