"""Precomputed reference log-probs: content keys, the on-disk cache, and the ref pass."""
import flax.linen as nn
import jax
import numpy as np

from prefjax import models
from prefjax import sharding as sharding_lib
from prefjax.train import reference as ref_lib
from prefjax.train import tasks as tasks_lib
from tests.train import helpers


def test_row_keys_depend_on_content_only():
  a = helpers.pair_batch(4, seed=0)
  b = {k: v[::-1].copy() for k, v in a.items()}
  assert ref_lib.row_keys(a) == ref_lib.row_keys(b)[::-1]
  assert len(set(ref_lib.row_keys(a))) == 4


def test_cache_round_trip(tmp_path):
  d = ref_lib.cache_dir(str(tmp_path), {"data": "x", "reference": "y"})
  c = ref_lib.RefLogpsCache(d, {"data": "x"})
  c.add(["k1", "k2"], np.array([[1.0, 2.0], [3.0, 4.0]]))
  c.save("0")
  c2 = ref_lib.RefLogpsCache(d).load()
  np.testing.assert_array_equal(c2.lookup(["k2", "k1"]), [[3.0, 4.0], [1.0, 2.0]])
  assert ref_lib.cache_dir(str(tmp_path), {"data": "z", "reference": "y"}) != d


def test_precomputed_equals_live_reference():
  mesh = helpers.mesh_of(2)
  cfg = helpers.model_cfg()
  batch = helpers.pair_batch(4, seed=3)
  with jax.set_mesh(mesh), nn.logical_axis_rules(list(sharding_lib.LOGICAL_AXIS_RULES)):
    params = models.init_params(cfg, jax.random.PRNGKey(0), mesh=mesh)
    psh = models.param_shardings(cfg, mesh)
    fn = ref_lib.make_ref_fn(cfg, "padded", 8, psh, mesh)
    cache = ref_lib.RefLogpsCache("/nonexistent")
    n = ref_lib.precompute(cache, fn, params, iter([batch]), mesh, num_batches=1)
    assert n == 1
    with_ref = ref_lib.attach(batch, cache)
    assert with_ref["ref_logps"].shape == (4, 2)
    gb = sharding_lib.make_global_batch(batch, mesh)
    lp, _ = tasks_lib._paired_logps(params, params, gb, model_cfg=cfg, layout="padded",  # pylint: disable=protected-access
                                    ref_mode="model", chunk_size=8)
  np.testing.assert_allclose(with_ref["ref_logps"][:, 0], np.asarray(lp.ref_chosen), rtol=1e-6)
  np.testing.assert_allclose(with_ref["ref_logps"][:, 1], np.asarray(lp.ref_rejected),
                             rtol=1e-6)
  # A second pass finds everything cached and computes nothing.
  with jax.set_mesh(mesh):
    assert ref_lib.precompute(cache, fn, params, iter([batch]), mesh, num_batches=1) == 0
