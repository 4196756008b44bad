"""End-to-end: the CLI trains, resumes bitwise after SIGKILL, stops on NaN / bad workdir."""
import os

import numpy as np
import pytest

from tests.train import loop_helpers as lh


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
  return lh.write_pairs(tmp_path_factory.mktemp("data") / "pairs.jsonl")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_path):
  wd = str(tmp_path_factory.mktemp("full"))
  r = lh.run_main(wd, lh.overrides(data_path))
  assert r.returncode == 0, r.stderr[-3000:]
  return wd


def test_run_writes_outputs(uninterrupted):
  for name in ("metrics.jsonl", "config.json", "checkpoints", "tensorboard"):
    assert os.path.exists(os.path.join(uninterrupted, name)), name
  ls = lh.losses(uninterrupted)
  assert sorted(ls) == list(range(1, 7))
  assert all(np.isfinite(list(ls.values())))
  import json  # pylint: disable=g-import-not-at-top
  with open(os.path.join(uninterrupted, "metrics.jsonl")) as f:
    train_rows = [r for r in map(json.loads, f) if "loss" in r and "perf/step_s" in r]
  assert len(train_rows) == 6
  assert all(r["perf/data_wait_s"] >= 0 and r["perf/step_s"] > 0
             for r in train_rows)
  ev = lh.eval_rows(uninterrupted)
  assert [r["step"] for r in ev] == [3, 6]
  assert {"eval/loss", "eval/accuracy", "eval/rewards/margins",
          "eval/diag/kl_per_token", "eval/diag/topk_entropy"} <= set(ev[-1])


def test_sigkill_then_rerun_is_bitwise_identical(tmp_path, data_path, uninterrupted):
  wd = str(tmp_path / "killed")
  args = lh.overrides(data_path)
  r = lh.run_main(wd, args + ["--config.train.debug_signal_at_step=5"])
  assert r.returncode == -9, r.stderr[-3000:]  # killed by SIGKILL after step 5
  assert max(lh.losses(wd)) == 5
  r = lh.run_main(wd, args)  # the same command resumes from the last complete checkpoint
  assert r.returncode == 0, r.stderr[-3000:]
  assert lh.losses(wd) == lh.losses(uninterrupted)  # bitwise: float equality
  a, b = lh.final_params(wd), lh.final_params(uninterrupted)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_sigterm_saves_and_exits_with_128_plus_the_signal(tmp_path, data_path):
  wd = str(tmp_path / "term")
  args = lh.overrides(data_path, **{"train.debug_signal_at_step": 3,
                                    "train.debug_signal": "SIGTERM", "ckpt.every_steps": 100})
  r = lh.run_main(wd, args)
  assert r.returncode == 143, r.stderr[-3000:]  # 128 + SIGTERM: not a success
  assert "stopped by SIGTERM at step 3, checkpoint saved (step 3)" in r.stderr
  assert "done:" not in r.stderr and "Traceback" not in r.stderr
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["3"]


def test_nan_loss_stops_naming_the_step(tmp_path, data_path):
  """A step whose loss is not finite stops the run naming it and saves nothing from it (a
  learning rate of 1e38 sends the parameters to inf at step 1: step 2's loss is NaN; a NaN
  hyperparameter is refused earlier, by validation)."""
  wd = str(tmp_path / "nan")
  r = lh.run_main(wd, lh.overrides(data_path, **{"optim.learning_rate": 1e38,
                                                 "ckpt.every_steps": 1}))
  assert r.returncode == 2, r.stderr[-2000:]
  assert "non-finite loss" in r.stderr and "step 2" in r.stderr
  assert "Traceback" not in r.stderr
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["1"]


def test_unwritable_workdir_fails_before_training(tmp_path, data_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  r = lh.run_main(str(blocker / "run"), lh.overrides(data_path))
  assert r.returncode == 2
  assert "not writable" in r.stderr and "Traceback" not in r.stderr


def test_export_writes_hf_checkpoint(tmp_path, data_path, uninterrupted):
  out = tmp_path / "hf"
  r = lh.run_main(str(tmp_path / "exp"), lh.overrides(data_path, **{
      "task": "export", "export.from_workdir": uninterrupted, "export.output_dir": str(out)}))
  assert r.returncode == 0, r.stderr[-3000:]
  assert (out / "config.json").exists()
  assert any(p.suffix == ".safetensors" for p in out.iterdir())


def test_precomputed_reference_matches_live_reference(tmp_path, data_path, uninterrupted):
  wd = str(tmp_path / "pre")
  r = lh.run_main(wd, lh.overrides(data_path, **{"reference.mode": "precomputed",
                                                 "total_steps": 3, "eval.every_steps": 0}))
  assert r.returncode == 0, r.stderr[-3000:]
  live, pre = lh.losses(uninterrupted), lh.losses(wd)
  np.testing.assert_allclose([pre[s] for s in (1, 2, 3)], [live[s] for s in (1, 2, 3)],
                             rtol=2e-5, atol=1e-6)
  assert os.listdir(os.path.join(wd, "ref_logps"))


def test_workdir_initialised_from_hf_records_its_architecture(tmp_path, data_path):
  """A run started from an HF checkpoint whose architecture differs from the recipe's saves
  the resolved architecture, so a second run initialised from that workdir (with the recipe's
  own model keys) loads it without shape errors."""
  import jax  # pylint: disable=g-import-not-at-top
  from prefjax import models  # pylint: disable=g-import-not-at-top
  cfg = models.get_config("tiny_gemma", vocab_size=32_000, embed_dim=48, num_layers=3)
  models.save_hf_checkpoint(cfg, models.init_params(cfg, jax.random.PRNGKey(0)), tmp_path / "hf")
  args = lh.overrides(data_path, total_steps=2, **{"eval.every_steps": 0,
                                                   "reference.mode": "none",
                                                   "loss.name": "simpo"})
  first = tmp_path / "first"
  r = lh.run_main(str(first), args + [f"--config.model.init={tmp_path / 'hf'}"])
  assert r.returncode == 0, r.stderr[-3000:]
  import json  # pylint: disable=g-import-not-at-top
  saved = json.loads((first / "config.json").read_text())["resolved_model"]
  assert (saved["embed_dim"], saved["num_layers"]) == (48, 3)
  r = lh.run_main(str(tmp_path / "second"), args + [f"--config.model.init={first}"])
  assert r.returncode == 0, r.stderr[-3000:]
  assert sorted(lh.losses(str(tmp_path / "second"))) == [1, 2]
