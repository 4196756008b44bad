"""prefjax.eval.plots: every figure is written as a non-empty PNG."""
import numpy as np
import pytest

from prefjax.eval import runner

plots = pytest.importorskip("prefjax.eval.plots")
PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(path):
  data = path.read_bytes()
  return data[:8] == PNG and len(data) > 2000


def _set_result(name, tag, rng, n=40):
  c, r = rng.normal(0.5, 1, n), rng.normal(0, 1, n)
  lc, lr = rng.integers(1, 200, n).astype(float), rng.integers(1, 200, n).astype(float)
  scores = runner.ScoredPairs(c, r, lc, lr)
  return runner.SetResult(name, tag, runner.scored_metrics(scores, bootstrap=50), scores)


def test_write_eval_plots_two_kinds(tmp_path):
  """The figures `evaluate_and_report` writes: histograms, length buckets, accuracy bars."""
  rng = np.random.default_rng(0)
  results = {"explicit": {"hh": _set_result("hh", "id", rng),
                          "pandalm": _set_result("pandalm", "ood", rng)},
             "implicit": {"hh": _set_result("hh", "id", rng)}}
  files = plots.write_eval_plots(tmp_path, results)
  assert set(files) == {"hist_explicit", "hist_implicit", "length_explicit", "length_implicit",
                        "accuracy"}
  for path in files.values():
    assert _is_png(path), path


def test_single_plots(tmp_path):
  rng = np.random.default_rng(1)
  sets = {"hh": (rng.normal(0.5, 1, 40), rng.normal(0, 1, 40)), "empty": (np.zeros(0),) * 2}
  assert _is_png(plots.plot_score_histograms(sets, tmp_path / "h.png", title="scores"))
  assert _is_png(plots.plot_generation_scores(
      {"base": rng.normal(0, 1, 64), "dpo": rng.normal(1, 1, 64)}, tmp_path / "sub" / "g.png"))
  with pytest.raises(ValueError):
    plots.plot_score_histograms({}, tmp_path / "x.png")
  with pytest.raises(ValueError):
    plots.plot_generation_scores({"a": []}, tmp_path / "x.png")
