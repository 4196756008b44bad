"""Tasks: packed and prompt-independent layouts agree with padded; KTO and SFT losses."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from prefjax import models
from prefjax import ops
from prefjax.train import tasks as tasks_lib
from tests.train import helpers


def pack_pairs(batch, pairs_per_row: int = 2):
  """Packs padded pairs [B, 2, L] into rows of `pairs_per_row` pairs (chosen, rejected, ...)."""
  b, _, length = batch["tokens"].shape
  rows = b // pairs_per_row
  out = {k: np.zeros((rows, 2 * pairs_per_row * length), v.dtype) for k, v in batch.items()}
  out["pair_mask"] = np.ones((rows, pairs_per_row), np.float32)
  for r in range(rows):
    at = 0
    for p in range(pairs_per_row):
      for k in range(2):
        i = r * pairs_per_row + p
        n = int(batch["segment_ids"][i, k].sum())
        for key in ("tokens", "targets", "loss_mask", "positions"):
          out[key][r, at:at + n] = batch[key][i, k, :n]
        out["segment_ids"][r, at:at + n] = 2 * p + k + 1
        at += n
  return out


def _loss(task, layout, batch, loss_name="dpo", ref_mode="model"):
  cfg = helpers.model_cfg(task)
  params = models.init_params(cfg, jax.random.PRNGKey(0))
  ref = models.init_params(cfg, jax.random.PRNGKey(1))
  lc = ml_collections.ConfigDict({"name": loss_name, "beta": 0.1} if task != "reward"
                                 else {"name": "bradley_terry"})
  t = tasks_lib.make_task(task, model_cfg=cfg, layout=layout, loss_config=lc, ref_mode=ref_mode,
                          chunk_size=8)
  total, stats = t.loss_fn(params, ref, jax.tree.map(jnp.asarray, batch))
  return float(total / stats["loss"][1]), {k: float(s / n) for k, (s, n) in stats.items()}


@pytest.mark.parametrize("task", ["preference", "reward"])
def test_packed_equals_padded(task):
  batch = helpers.pair_batch(4, seed=2)
  loss_pad, st_pad = _loss(task, "padded", batch)
  loss_pack, st_pack = _loss(task, "packed", pack_pairs(batch))
  np.testing.assert_allclose(loss_pack, loss_pad, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(st_pack["rewards/margins"], st_pad["rewards/margins"],
                             rtol=1e-4, atol=1e-5)


def test_last_token_index():
  seg = jnp.array([[1, 1, 2, 2, 2, 0], [1, 1, 1, 0, 0, 0]])
  np.testing.assert_array_equal(tasks_lib.last_token_index(seg, 2), [[1, 4], [2, 0]])


def test_sft_loss_is_token_mean_nll():
  batch = {k: v[:, 0] for k, v in helpers.pair_batch(4, seed=5).items()}
  cfg = helpers.model_cfg()
  params = models.init_params(cfg, jax.random.PRNGKey(0))
  t = tasks_lib.make_task("sft", model_cfg=cfg, layout="sft",
                          loss_config=ml_collections.ConfigDict({"name": "nll"}), chunk_size=8)
  total, stats = t.loss_fn(params, None, jax.tree.map(jnp.asarray, batch))
  logits = models.forward(cfg, params, batch["tokens"], segment_ids=batch["segment_ids"],
                          positions=batch["positions"])
  lp = ops.token_logps_from_logits(logits, batch["targets"])
  want = -(lp * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
  np.testing.assert_allclose(float(total / stats["loss"][1]), float(want), rtol=1e-5)


def test_kto_loss_runs_with_kl_batch():
  pairs = helpers.pair_batch(4, seed=6)
  batch = {k: pairs[k][:, 0] for k in pairs}
  batch.update({"kl_" + k: pairs[k][:, 1] for k in pairs})
  batch["label"] = np.array([1, 0, 1, 0], np.float32)
  loss, stats = _loss("kto", "unpaired", batch, loss_name="kto")
  assert np.isfinite(loss) and "rewards/chosen" in stats
