"""prefjax.eval.cases: generation summaries and the case-study table."""
import json

import pytest

from prefjax.eval import cases

A = [{"prompt": "p1", "response": "a1", "score": 1.0},
     {"prompt": "p2", "response": "a2|x", "score": 0.0},
     {"prompt": "p3", "response": "a3", "score": 2.0},
     {"prompt": "p3", "response": "a3 again", "score": 4.0},  # p3 mean = 3
     {"prompt": "only_a", "response": "z", "score": 9.0}]
B = [{"prompt": "p1", "response": "b1", "score": 1.5},
     {"prompt": "p2", "response": "b2\nline", "score": -4.0},
     {"prompt": "p3", "response": "b3", "score": 5.0}]


def test_case_study_order_and_markdown():
  rows = cases.case_study_rows(A, B, top_k=2)
  assert [r["prompt"] for r in rows] == ["p2", "p3"]  # |Δ| = 4, 2 (then p1: 0.5)
  assert rows[0]["delta"] == pytest.approx(-4.0) and rows[1]["score_a"] == pytest.approx(3.0)
  assert rows[1]["response_a"] == "a3"
  md = cases.case_study_markdown(A, B, names=("base", "dpo"), top_k=10)
  lines = [l for l in md.splitlines() if l.startswith("| ")]
  assert len(lines) == 1 + 3  # header + 3 shared prompts
  assert lines[1].startswith("| 1 | p2 | a2\\|x | 0.000 | b2<br>line | -4.000 | -4.000 |")
  assert "Δ (dpo − base)" in lines[0]


def test_summary_and_loading(tmp_path):
  s = cases.generation_summary({"base": iter(A), "dpo": B})  # generators are fine
  assert s["policies"]["base"]["n"] == 5 and s["policies"]["dpo"]["mean"] == pytest.approx(2.5 / 3)
  assert s["win_rate"]["dpo_vs_base"] == pytest.approx(2 / 3)  # p1, p3 won, p2 lost
  assert s["win_rate"]["base_vs_dpo"] == pytest.approx(1 / 3)
  path = tmp_path / "g.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in A) + "\n\n")
  assert cases.load_generations(path) == A
  path.write_text('{"prompt": "p", "response": "r"}\n')
  with pytest.raises(ValueError, match=r"g.jsonl:1: missing field 'score'"):
    cases.load_generations(path)


def test_write_generation_report(tmp_path):
  paths = cases.write_generation_report(tmp_path, {"base": A, "dpo": B}, plot=False)
  data = json.loads(paths["json"].read_text())
  assert data["win_rate"]["dpo_vs_base"] == pytest.approx(2 / 3)
  md = paths["markdown"].read_text()
  assert "| base | 5 | 3.200 |" in md and "Win rate of dpo over base" in md
  assert "| 1 | p2 |" in md


def test_cell_turns_carriage_returns_into_breaks():
  from prefjax.eval.cases import _cell  # pylint: disable=g-import-not-at-top
  assert _cell("a\rb\r\nc|d", 100) == "a<br>b<br>c\\|d"
