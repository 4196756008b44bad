"""prefjax.eval.report: files exist, parse, and carry the metrics' exact values."""
import html.parser
import json
import math

import pytest

from prefjax.eval import metrics, report

TAGS = {"hh_a": "id", "hh_b": "id", "ood_a": "ood", "ood_b": "ood"}


def _by_kind():
  def m(c, r):
    return metrics.pair_metrics(c, r, chosen_lengths=[3] * len(c), rejected_lengths=[1] * len(c),
                                bootstrap=50)
  explicit = {"hh_a": m([1, 2, 3, 4], [0, 0, 0, 5]),   # 0.75
              "hh_b": m([1, 1], [0, 0]),               # 1.0
              "ood_a": m([1, 0], [0, 1]),              # 0.5
              "ood_b": m([0, 0, 1, 1], [1, 1, 1, 0])}  # 0.375 (one score tie)
  implicit = {k: m([-x for x in v_c], [-x for x in v_r]) for k, (v_c, v_r) in {
      "hh_a": ([1, 2, 3, 4], [0, 0, 0, 5]), "hh_b": ([1, 1], [0, 0]),
      "ood_a": ([1, 0], [0, 1]), "ood_b": ([0, 0, 1, 1], [1, 1, 1, 0])}.items()}
  return {"explicit": explicit, "implicit": implicit}


class _TableParser(html.parser.HTMLParser):
  def __init__(self):
    super().__init__()
    self.tables, self.cells, self._in = 0, [], False
  def handle_starttag(self, tag, attrs):
    self.tables += tag == "table"
    self._in = tag in ("td", "th")
  def handle_endtag(self, tag):
    self._in = False if tag in ("td", "th") else self._in
  def handle_data(self, data):
    if self._in:
      self.cells.append(data)


def test_write_report_json_md_html(tmp_path):
  by_kind = _by_kind()
  paths = report.write_report(tmp_path, by_kind, tags=TAGS, meta={"step": 10})
  assert {p.name for p in paths.values()} == {"eval_results.json", "eval_results.md",
                                               "eval_results.html"}
  data = json.loads(paths["json"].read_text())
  assert data["schema"] == report.SCHEMA and data["meta"] == {"step": 10}
  ex = data["models"]["explicit"]
  for name, m in by_kind["explicit"].items():
    for key in ("n_pairs", "accuracy", "mean", "std", "margin_mean", "n_score_ties"):
      assert ex["sets"][name][key] == pytest.approx(m[key]), (name, key)
    assert ex["sets"][name]["accuracy_ci"] == pytest.approx(list(m["accuracy_ci"]))
  assert ex["sets"]["ood_b"]["accuracy"] == pytest.approx(0.375)
  assert ex["summary"]["id_mean"] == pytest.approx(0.875)
  assert ex["summary"]["ood_mean"] == pytest.approx(0.4375)
  assert ex["summary"]["drop"] == pytest.approx(0.4375)
  # implicit = negated scores: accuracy 1 - acc (ties stay 0.5)
  assert data["models"]["implicit"]["sets"]["hh_a"]["accuracy"] == pytest.approx(0.25)
  assert data["comparison"]["accuracy_delta"]["hh_b"] == pytest.approx(-1.0)
  # empty length buckets have NaN accuracy -> null in strict JSON
  diff_buckets = ex["sets"]["hh_a"]["length_bias"]["by_length_diff"]
  assert any(b["accuracy"] is None for b in diff_buckets)
  assert "NaN" not in paths["json"].read_text()

  md = paths["markdown"].read_text()
  for name in TAGS:
    assert f"| {name} |" in md
  assert "## Comparison" in md and "ID − OOD drop" in md and "+0.438" in md
  p = _TableParser()
  p.feed(paths["html"].read_text())
  assert p.tables == 3  # explicit, implicit, comparison
  assert "0.375" in p.cells and "ood_b" in p.cells


def test_single_kind_and_nan_formatting(tmp_path):
  sets = {"x": metrics.pair_metrics([1.0], [0.0], bootstrap=0)}
  paths = report.write_report(tmp_path, {"rm": sets}, tags={"x": "ood"}, basename="r")
  data = json.loads(paths["json"].read_text())
  assert "comparison" not in data
  assert data["models"]["rm"]["summary"]["id_mean"] is None  # no ID set -> NaN -> null
  assert math.isnan(report.summarize({"rm": sets}, {"x": "ood"})["rm"]["drop"])
  assert "| x | ood | 1 | 1.000 | – |" in paths["markdown"].read_text()
  with pytest.raises(ValueError, match="2 reward kinds"):
    report.comparison_rows({"rm": sets}, {})
