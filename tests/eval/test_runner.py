"""prefjax.eval.runner on fake in-memory batches; registry against the real files."""
import gzip
import json
import math

import numpy as np
import pytest

from prefjax.eval import metrics, registry, runner

L = 6


def _padded_batches(chosen, rejected, lc, lr, batch_size, mask_key="pair_mask"):
  """Batches in the padded pair layout; the score is carried in token 0 of each sequence
  (score_fn reads it back), lengths in loss_mask; last batch padded with junk pairs."""
  n = len(chosen)
  batches = []
  for start in range(0, n, batch_size):
    idx = list(range(start, min(n, start + batch_size)))
    tokens = np.full((batch_size, 2, L), 7.0, np.float32)  # junk in padded slots
    loss_mask = np.ones((batch_size, 2, L), np.float32)
    valid = np.zeros(batch_size, np.float32)
    for j, i in enumerate(idx):
      tokens[j, 0, 0], tokens[j, 1, 0] = chosen[i], rejected[i]
      loss_mask[j, 0], loss_mask[j, 1] = 0, 0
      loss_mask[j, 0, L - lc[i]:] = 1
      loss_mask[j, 1, L - lr[i]:] = 1
      valid[j] = 1
    batches.append({"tokens": tokens, "loss_mask": loss_mask, mask_key: valid})
  return batches


def _score_padded(batch):
  return batch["tokens"][:, 0, 0], batch["tokens"][:, 1, 0]


C = np.array([2.0, 0.0, 1.0, 3.0, -1.0, 0.5, 4.0])
R = np.array([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, -2.0])
LC = np.array([1, 2, 3, 4, 5, 6, 2])
LR = np.array([3, 3, 3, 1, 1, 6, 5])


@pytest.mark.parametrize("mask_key", ["pair_mask", "example_mask"])
def test_padded_last_batch_equals_unpadded_metrics(mask_key):
  batches = _padded_batches(C, R, LC, LR, batch_size=3, mask_key=mask_key)
  assert len(batches) == 3  # 3 + 3 + 1 real pairs, 2 padded
  scored = runner.score_batches(_score_padded, batches, progress=False)
  np.testing.assert_array_equal(scored.chosen, C)
  np.testing.assert_array_equal(scored.rejected, R)
  np.testing.assert_array_equal(scored.chosen_lengths, LC)
  np.testing.assert_array_equal(scored.rejected_lengths, LR)
  got = runner.scored_metrics(scored, bootstrap=100)
  want = metrics.pair_metrics(C, R, chosen_lengths=LC, rejected_lengths=LR, bootstrap=100)
  assert json.dumps(got, sort_keys=True) == json.dumps(want, sort_keys=True)  # NaN-safe
  assert got["n_pairs"] == 7 and got["accuracy"] == pytest.approx(4.5 / 7)


def test_packed_and_prompt_shared_layouts():
  # packed: 2 rows x 2 pair slots; row 1 slot 1 is padding. Segment k: chosen 2p+1, rej 2p+2.
  seg = np.array([[1, 1, 2, 2, 2, 3, 4, 4, 0, 0],
                  [1, 1, 1, 2, 0, 0, 0, 0, 0, 0]])
  lm = np.array([[0, 1, 0, 1, 1, 1, 1, 1, 0, 0],
                 [0, 1, 1, 1, 0, 0, 0, 0, 0, 0]], np.float32)
  pair_mask = np.array([[1, 1], [1, 0]], np.float32)
  scores = np.array([[[0.3, 0.1], [0.0, 0.2]], [[5.0, 5.0], [9.0, -9.0]]])
  batch = {"loss_mask": lm, "segment_ids": seg, "pair_mask": pair_mask, "s": scores}
  fn = lambda b: (b["s"][..., 0], b["s"][..., 1])
  out = runner.score_batches(fn, [batch], progress=False)
  np.testing.assert_array_equal(out.chosen, [0.3, 0.0, 5.0])
  np.testing.assert_array_equal(out.chosen_lengths, [1, 1, 2])
  np.testing.assert_array_equal(out.rejected_lengths, [2, 2, 1])
  # prompt-shared: one row, pair 1 = segment 1 (branches 0 prompt, 1 chosen, 2 rejected)
  batch = {"loss_mask": np.array([[0, 0, 1, 1, 1, 1, 1, 0]], np.float32),
           "segment_ids": np.array([[1, 1, 1, 1, 1, 1, 1, 0]]),
           "branch_ids": np.array([[0, 0, 1, 1, 1, 2, 2, 0]]),
           "pair_mask": np.array([[1.0]]), "s": np.array([[[1.0, 2.0]]])}
  out = runner.score_batches(fn, [batch], progress=False)
  assert out.chosen_lengths.tolist() == [3] and out.rejected_lengths.tolist() == [2]
  with pytest.raises(ValueError, match="pair_mask"):
    runner.score_batches(fn, [{"loss_mask": lm, "s": scores[:, 0]}], progress=False)


def test_evaluate_sets_callable_sources_and_tags():
  seen = []
  def source(bs):
    seen.append(bs)
    return _padded_batches(C, R, LC, LR, batch_size=bs)
  res = runner.evaluate_sets(_score_padded, {"hh_helpful_base": source, "mine": source},
                             batch_size=4, bootstrap=0, progress=False)
  assert seen == [4, 4]
  assert res["hh_helpful_base"].tag == "id" and res["mine"].tag is None
  assert res["mine"].metrics["accuracy"] == pytest.approx(4.5 / 7)
  assert res["mine"].metrics["accuracy_ci"] is None
  res = runner.evaluate_sets(lambda b: (b["c"], b["r"]), {"x": [{"c": [1.0], "r": [2.0]}]},
                             batch_size=1, tags={"x": "ood"}, progress=False)
  assert res["x"].tag == "ood" and res["x"].metrics["accuracy"] == 0.0
  assert "length_bias" not in res["x"].metrics  # no loss_mask -> lengths unknown


def test_evaluate_and_report_writes_everything(tmp_path):
  reads = []
  def source(c, r, lc, lr):
    def make(bs):
      reads.append(bs)
      return _padded_batches(c, r, lc, lr, batch_size=bs)
    return make
  src = {"hh_helpful_base": source(C, R, LC, LR), "pandalm": source(R, C, LR, LC)}
  neg = lambda b: tuple(-x for x in _score_padded(b))
  out = runner.evaluate_and_report({"explicit": _score_padded, "implicit": neg}, src,
                                   workdir=tmp_path, batch_size=3, bootstrap=50, progress=False,
                                   meta={"beta": 0.1}, plots=False)  # plots: test_plots.py
  assert reads == [3, 3]  # each set read once for both kinds
  data = json.loads((tmp_path / "eval_results.json").read_text())
  ex = data["models"]["explicit"]
  assert ex["sets"]["hh_helpful_base"]["accuracy"] == pytest.approx(4.5 / 7)
  assert ex["sets"]["pandalm"]["accuracy"] == pytest.approx(2.5 / 7)
  assert ex["summary"]["drop"] == pytest.approx(2 / 7)
  assert data["comparison"]["kinds"] == ["explicit", "implicit"]
  assert out["results"]["implicit"]["pandalm"].metrics["accuracy"] == pytest.approx(4.5 / 7)
  back = runner.load_scores(out["files"]["scores"])
  np.testing.assert_array_equal(back["implicit"]["pandalm"].chosen, -R)
  np.testing.assert_array_equal(back["explicit"]["hh_helpful_base"].rejected_lengths, LR)
  for key in ("json", "markdown", "html"):
    assert out["files"][key].stat().st_size > 0
  again = runner.rerender(out["files"]["scores"], tmp_path / "re", ties="exclude", bootstrap=0,
                          plots=False)
  ex2 = json.loads(again["json"].read_text())["models"]["explicit"]["sets"]
  assert ex2["hh_helpful_base"]["accuracy"] == pytest.approx(4 / 6)  # the tie is dropped


def test_registry_paths_resolution(tmp_path, monkeypatch):
  monkeypatch.setenv(registry.ENV_VAR, str(tmp_path))
  assert registry.default_shared_data_dir() == tmp_path
  with pytest.raises(FileNotFoundError, match="pandalm.*PREFJAX_SHARED_DATA"):
    registry.resolve_path("pandalm")
  p = tmp_path / "pandalm-testset" / "testset-v1.json"
  p.parent.mkdir()
  p.write_text("[]")
  assert registry.resolve_path("pandalm") == p
  monkeypatch.delenv(registry.ENV_VAR)
  assert registry.default_shared_data_dir().parts[-2:] == ("shared", "data")
  with pytest.raises(ValueError, match="unknown eval set"):
    registry.get_spec("nope")
  assert set(registry.ID_SETS) == {n for n in registry.EVAL_SETS if n.startswith("hh_")}
  calls = []
  srcs = runner.registry_sources(["pandalm"], lambda spec, path, bs: calls.append(
      (spec.format, path, bs)) or [], shared_data_dir=tmp_path)
  assert list(srcs["pandalm"](8)) == [] and calls == [("pandalm", p, 8)]


def _raw_counts(path):
  """(records, pairs with a preference) counted straight from the file (no prefjax.data)."""
  if path.suffix == ".gz":
    recs = [json.loads(l) for l in gzip.open(path, "rt", encoding="utf-8")]
  elif path.suffix == ".jsonl":
    recs = [json.loads(l) for l in path.open(encoding="utf-8") if l.strip()]
  else:
    recs = json.loads(path.read_text(encoding="utf-8"))
  def has_pref(r):
    if "annotator1" in r:  # PandaLM: majority of 3 annotators, 0 = tie
      votes = [r["annotator1"], r["annotator2"], r["annotator3"]]
      top = max(set(votes), key=votes.count)
      return votes.count(top) >= 2 and top != 0
    if "metadata" in r:  # UltraFeedback: strict GPT-4 score gap
      return r["metadata"]["score_chosen"] > r["metadata"]["score_rejected"]
    if "chosen" in r and "prompt" not in r:  # HH-RLHF: identical texts carry no preference
      return r["chosen"] != r["rejected"]
    return True
  return len(recs), sum(map(has_pref, recs))


def test_registry_matches_shared_files(shared_dir):
  data_dir = shared_dir / "data"
  for name, spec in registry.EVAL_SETS.items():
    path = registry.resolve_path(name, data_dir)
    assert _raw_counts(path) == (spec.num_records, spec.num_pairs), name
