"""prefjax.eval.metrics against hand-computed values."""
import math

import numpy as np
import pytest

from prefjax.eval import metrics

# Pairs: correct, wrong, exact score tie, correct.
C = [3.0, 1.0, 2.0, 5.0]
R = [1.0, 2.0, 2.0, 0.0]


@pytest.mark.parametrize("ties,expected", [("half", 2.5 / 4), ("exclude", 2 / 3), ("zero", 2 / 4)])
def test_accuracy_ties(ties, expected):
  assert metrics.accuracy(C, R, ties=ties) == pytest.approx(expected)


def test_accuracy_mask_excludes_pairs():
  # Drop the tie (index 2): 2 of 3 correct, whatever the tie policy.
  for ties in metrics.TIES:
    assert metrics.accuracy(C, R, mask=[1, 1, 0, 1], ties=ties) == pytest.approx(2 / 3)
  assert math.isnan(metrics.accuracy(C, R, mask=[0, 0, 0, 0]))


def test_reward_stats_hand_values():
  s = metrics.reward_stats([1.0, 3.0, 99.0], [0.0, 0.0, -99.0], mask=[1, 1, 0])
  # all scores [1, 3, 0, 0]: mean 1, var (0 + 4 + 1 + 1) / 4 = 1.5
  assert s["mean"] == pytest.approx(1.0)
  assert s["std"] == pytest.approx(math.sqrt(1.5))
  assert s["chosen_mean"] == pytest.approx(2.0) and s["chosen_std"] == pytest.approx(1.0)
  assert s["rejected_mean"] == 0.0 and s["rejected_std"] == 0.0
  assert s["margin_mean"] == pytest.approx(2.0) and s["margin_std"] == pytest.approx(1.0)


def test_length_bias_buckets_by_hand():
  # diff = lc - lr per pair:     -100, -5,   0,    0,   10,  100
  lc = np.array([10, 20, 30, 40, 50, 150])
  lr = np.array([110, 25, 30, 40, 40, 50])
  chosen = np.array([1.0, 0.0, 1.0, 1.0, 1.0, 1.0])
  rejected = np.array([0.0, 1.0, 1.0, 0.0, 0.0, 2.0])
  # credit (ties=half):           1,   0,  0.5,  1,   1,   0
  lb = metrics.length_bias(chosen, rejected, lc, lr, total_edges=[0, 100, math.inf])
  by_diff = {b["label"]: (b["n"], b["accuracy"]) for b in lb["by_length_diff"]}
  assert by_diff["<-64"] == (1, 1.0)
  assert by_diff["[-16,0)"] == (1, 0.0)
  assert by_diff["0"] == (2, 0.75)
  assert by_diff["[1,17)"] == (1, 1.0)
  assert by_diff[">=65"] == (1, 0.0)
  assert by_diff["[-64,-16)"][0] == 0 and math.isnan(by_diff["[-64,-16)"][1])
  # totals: 120, 45, 60, 80, 90, 200 -> [0,100): idx 1..4 credit 0,.5,1,1; [100,inf): 1, 0
  by_total = [(b["n"], b["accuracy"]) for b in lb["by_total_length"]]
  assert by_total == [(4, pytest.approx(2.5 / 4)), (2, pytest.approx(0.5))]
  assert lb["frac_chosen_longer"] == pytest.approx(2 / 6)
  # unequal-length pairs: idx 0 (rejected longer, rej scored lower -> no), 1 (rej longer,
  # rej higher -> yes), 4 (chosen longer, higher -> yes), 5 (chosen longer, lower -> no)
  assert lb["frac_longer_preferred"] == pytest.approx(0.5)


def test_quantile_edges():
  edges = metrics.quantile_edges(np.arange(1, 101), num_buckets=4)
  assert edges[0] == -math.inf and edges[-1] == math.inf
  assert edges[1:-1] == [26.0, 51.0, 76.0]  # ceil of 25.75, 50.5, 75.25
  assert metrics.quantile_edges([5, 5, 5, 5]) == [-math.inf, 5.0, math.inf]


def test_bootstrap_ci_contains_estimate_and_shrinks():
  rng = np.random.default_rng(1)
  def sample(n):
    c = rng.normal(size=n) + 0.5
    return c, rng.normal(size=n)
  small, large = sample(60), sample(3000)
  widths = []
  for c, r in (small, large):
    lo, hi = metrics.bootstrap_accuracy_ci(c, r, num_resamples=500, seed=0)
    acc = metrics.accuracy(c, r)
    assert lo <= acc <= hi
    widths.append(hi - lo)
  assert widths[1] < widths[0] / 3  # ~ 1/sqrt(50)
  # seeded: identical; all-correct data: degenerate interval at 1
  assert metrics.bootstrap_accuracy_ci(*small, seed=3) == metrics.bootstrap_accuracy_ci(*small, seed=3)
  assert metrics.bootstrap_accuracy_ci([2, 3], [1, 1]) == (1.0, 1.0)


def test_pair_metrics_bundle():
  m = metrics.pair_metrics(C, R, chosen_lengths=[1, 2, 3, 4], rejected_lengths=[4, 3, 2, 1],
                           mask=[1, 1, 1, 0], bootstrap=200)
  assert m["n_pairs"] == 3 and m["n_score_ties"] == 1
  assert m["accuracy"] == pytest.approx(0.5)  # 1, 0, 0.5
  assert m["margin_mean"] == pytest.approx((2 - 1 + 0) / 3)
  lo, hi = m["accuracy_ci"]
  assert lo <= 0.5 <= hi
  assert sum(b["n"] for b in m["length_bias"]["by_length_diff"]) == 3
  assert "length_bias" not in metrics.pair_metrics(C, R, bootstrap=0)


def test_id_ood_summary_and_drop():
  res = {"a": {"accuracy": 0.7}, "b": {"accuracy": 0.8}, "c": {"accuracy": 0.6},
         "d": {"accuracy": 0.5}, "e": {"accuracy": 0.1}}
  s = metrics.id_ood_summary(res, {"a": "id", "b": "id", "c": "ood", "d": "ood"})
  assert s["id_mean"] == pytest.approx(0.75) and s["ood_mean"] == pytest.approx(0.55)
  assert s["drop"] == pytest.approx(0.2)
  assert s["id_sets"] == ["a", "b"] and s["ood_sets"] == ["c", "d"]
  assert metrics.accuracy_drop([0.9], [0.6, 0.7]) == pytest.approx(0.25)
  assert math.isnan(metrics.accuracy_drop([], [0.5]))
  with pytest.raises(ValueError, match="tag"):
    metrics.id_ood_summary(res, {"a": "test"})


def test_bad_inputs():
  with pytest.raises(ValueError, match="ties"):
    metrics.accuracy(C, R, ties="random")
  with pytest.raises(ValueError, match="differ"):
    metrics.accuracy([1.0, 2.0], [1.0])
  with pytest.raises(ValueError, match="mask"):
    metrics.accuracy(C, R, mask=[1, 0])
  with pytest.raises(ValueError, match="edges"):
    metrics.bucket_accuracy(C, R, C, [1.0, 1.0])
