"""Every registered eval set loads through prefjax.data with the documented pair count."""
import json

import pytest

from prefjax.eval import registry, runner

data = pytest.importorskip("prefjax.data")

# HH files take ~1 s each to validate: the fast suite checks the smallest one.
FAST = [n for n in registry.EVAL_SETS if not n.startswith("hh_")] + ["hh_helpful_online"]
SLOW = [n for n in registry.EVAL_SETS if n not in FAST]


def _loadable(name, data_dir, tmp_path):
  spec = registry.EVAL_SETS[name]
  path = registry.resolve_path(name, data_dir)
  if spec.drop_score_ties:
    path = runner.drop_score_ties(path, tmp_path)
  index = data.build_index(str(path), fmt=spec.format, policy="skip")
  return len(index.items)


@pytest.mark.parametrize("name", FAST)
def test_registered_set_loads(name, shared_dir, tmp_path):
  assert _loadable(name, shared_dir / "data", tmp_path) == registry.EVAL_SETS[name].num_loadable


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_registered_hh_set_loads(name, shared_dir, tmp_path):
  assert _loadable(name, shared_dir / "data", tmp_path) == registry.EVAL_SETS[name].num_loadable


def test_documented_counts():
  assert registry.EVAL_SETS["pandalm"].num_pairs == 894  # non-tie majority (README)
  assert registry.EVAL_SETS["llmbar_natural"].num_pairs == 100
  assert registry.EVAL_SETS["ultrafeedback_sample"].num_pairs == 175


def test_pipeline_end_to_end(shared_dir, tmp_path):
  """prefjax.data eval iterators -> runner: padded last batch masked, ties removed."""
  cfg = data.default_data_config()
  cfg.max_len, cfg.max_prompt_len, cfg.max_response_len = 128, 64, 64
  make = runner.pipeline_batches(cfg, cache_dir=tmp_path)
  srcs = runner.registry_sources(["llmbar_natural", "ultrafeedback_sample"], make,
                                 shared_data_dir=shared_dir / "data")
  def longer_wins(batch):  # score = response length in tokens
    lm = batch["loss_mask"]
    return lm[:, 0].sum(-1), lm[:, 1].sum(-1)
  res = runner.evaluate_sets(longer_wins, srcs, batch_size=48, bootstrap=0, progress=False)
  assert res["llmbar_natural"].metrics["n_pairs"] == 100  # 3 batches, last one padded
  assert res["ultrafeedback_sample"].metrics["n_pairs"] == 175
  for r in res.values():
    assert r.tag == "ood" and r.metrics["data_dropped"] == {}
    s = r.scores  # the score is the length, so lengths and scores agree exactly
    assert (s.chosen == s.chosen_lengths).all() and (s.rejected == s.rejected_lengths).all()
    assert 0 < r.metrics["accuracy"] < 1


def test_evaluate_registered_writes_report(shared_dir, tmp_path):
  cfg = data.default_data_config()
  cfg.max_len, cfg.max_prompt_len, cfg.max_response_len = 96, 48, 48
  shorter_wins = lambda b: (-b["loss_mask"][:, 0].sum(-1), -b["loss_mask"][:, 1].sum(-1))
  longer_wins = lambda b: (b["loss_mask"][:, 0].sum(-1), b["loss_mask"][:, 1].sum(-1))
  out = runner.evaluate_registered(
      {"shorter": shorter_wins, "longer": longer_wins}, data_config=cfg, workdir=tmp_path,
      batch_size=64, sets=["hh_helpful_online", "llmbar_natural"],
      shared_data_dir=shared_dir / "data", bootstrap=0, plots=False, progress=False)
  res = json.loads(out["files"]["json"].read_text())
  assert res["tags"] == {"hh_helpful_online": "id", "llmbar_natural": "ood"}
  sets = res["models"]["longer"]["sets"]
  hh = sets["hh_helpful_online"]
  assert hh["data_dropped"]["identical"] == 2 and hh["data_dropped"]["empty_response"] == 3
  assert hh["n_pairs"] + sum(hh["data_dropped"].values()) == 1137  # every record accounted for
  assert sets["llmbar_natural"]["n_pairs"] == 100
  for name, m in sets.items():  # ties (equal lengths) count 0.5 for both scorers
    other = res["models"]["shorter"]["sets"][name]
    assert m["accuracy"] + other["accuracy"] == pytest.approx(1.0)
