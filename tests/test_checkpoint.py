"""Checkpointer: state + grain iterator round trip, keep-N + best, disk checks."""
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefjax import checkpoint as ckpt_lib


def _iter():
  return iter(grain.MapDataset.range(100).shuffle(seed=1).batch(4).to_iter_dataset())


def test_state_and_iterator_round_trip(tmp_path):
  ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"), keep=2, async_save=True)
  state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.int32(3)}
  it = _iter()
  next(it)
  ck.save(3, state, it)
  ck.wait()
  expected = next(it)
  it2 = _iter()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                         sharding=x.sharding), state)
  restored = ck.restore(ck.latest_step(), abstract, it2)
  np.testing.assert_array_equal(restored["w"], state["w"])
  np.testing.assert_array_equal(next(it2), expected)
  ck.close()


def test_keeps_last_n_plus_best(tmp_path):
  ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"), keep=2, best_metric="eval/accuracy",
                             async_save=False)
  state = {"w": jnp.zeros(2)}
  accs = {1: 0.5, 2: 0.9, 3: 0.6, 4: 0.55, 5: 0.52}
  for step, acc in accs.items():
    ck.save(step, state, metrics={"eval/accuracy": acc})
  ck.wait()
  assert ck.all_steps() == [2, 4, 5]
  assert ck.best_step() == 2
  ck.close()


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / "f"
  blocker.write_text("")
  with pytest.raises(ckpt_lib.CheckpointError, match="not writable"):
    ckpt_lib.check_writable(str(blocker / "run"))


def test_full_disk_is_reported(tmp_path):
  with pytest.raises(ckpt_lib.CheckpointError, match="GiB free"):
    ckpt_lib.check_writable(str(tmp_path / "run"), min_free_bytes=1 << 60)
  assert os.path.isdir(tmp_path / "run")
