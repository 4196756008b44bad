"""Format adapters and auto-detection, on hand-made records and the real eval sets."""
import json

import pytest

from prefjax import data
from prefjax.data import formats
from prefjax.data.errors import BadRecord
from prefjax.data.index import build_index


def test_detect_and_parse_each_format():
  msgs = lambda *t: [{"role": r, "content": c} for r, c in t]  # noqa: E731
  cases = {
      "explicit": {"prompt": "P", "chosen": "C", "rejected": "R", "margin": 2},
      "conversational": {"chosen": msgs(("user", "P"), ("assistant", "C")),
                         "rejected": msgs(("user", "P"), ("assistant", "R"))},
      "hh": {"chosen": "\n\nHuman: P\n\nAssistant: C", "rejected": "\n\nHuman: P\n\nAssistant: R"},
      "unpaired": {"prompt": "P", "completion": "C", "label": True},
      "rankings": {"prompt": "P", "responses": ["C", "R", "S"], "scores": [3, 1, 2]},
      "sft": {"messages": msgs(("user", "P"), ("assistant", "C"))},
      "pandalm": {"instruction": "P", "input": "", "response1": "R", "response2": "C",
                  "annotator1": 2, "annotator2": 0, "annotator3": 2},
      "llmbar": {"input": "P", "output_1": "R", "output_2": "C", "label": 2},
  }
  for name, rec in cases.items():
    assert formats.detect(rec) == name, name
    ex = formats.parse(rec)
    assert ex.prompt == (("user", "P"),), name
    assert ex.responses[0] == "C", name
  assert formats.parse(cases["explicit"]).margin == 2.0
  assert formats.parse(cases["rankings"]).scores == (3.0, 1.0, 2.0)
  assert formats.parse({"prompt": "P", "responses": ["a", "b"], "ranks": [2, 1]}).scores == (
      -2.0, -1.0)
  assert formats.parse(cases["unpaired"]).label == 1.0


def test_conversational_shared_prompt_multiturn():
  turns = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
           {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}]
  rec = {"chosen": turns + [{"role": "assistant", "content": "C"}],
         "rejected": turns + [{"role": "assistant", "content": "R"}]}
  ex = formats.parse(rec)
  assert ex.prompt == (("system", "S"), ("user", "U1"), ("assistant", "A1"), ("user", "U2"))
  assert ex.responses == ("C", "R") and ex.first_user_turn() == "U1"
  rec["chosen"] = rec["chosen"] + [{"role": "user", "content": "more"}]
  with pytest.raises(BadRecord) as e:
    formats.parse(rec)
  assert e.value.field == "chosen"


def test_hh_multiturn_and_mismatched_prompts():
  c = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: yes"
  r = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: no"
  ex = formats.parse({"chosen": c, "rejected": r})
  assert ex.prompt == (("user", "a"), ("assistant", "b"), ("user", "c"))
  assert ex.prompt_text == "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:"
  # Different turn counts (real HH quirk): the shared prefix is cut at the last common marker.
  r2 = "\n\nHuman: a\n\nAssistant: other"
  ex = formats.parse({"chosen": c, "rejected": r2})
  assert ex.prompt_text == "\n\nHuman: a\n\nAssistant:"
  assert ex.responses == ("b\n\nHuman: c\n\nAssistant: yes", "other")
  with pytest.raises(BadRecord, match="empty response"):
    formats.parse({"chosen": c, "rejected": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: "})


def test_to_kind_conversions():
  ex = formats.parse({"prompt": "P", "chosen": "C", "rejected": "R"})
  u0, u1 = formats.to_kind(ex, "unpaired", 0), formats.to_kind(ex, "unpaired", 1)
  assert (u0.responses, u0.label, u1.responses, u1.label) == (("C",), 1.0, ("R",), 0.0)
  assert formats.to_kind(ex, "sft").responses == ("C",)
  assert formats.to_kind(ex, "rankings").scores == (1.0, 0.0)
  rk = formats.parse({"prompt": "P", "responses": ["a", "b", "c"], "scores": [1, 5, 0]})
  assert formats.to_kind(rk, "pairs").responses == ("b", "c")
  with pytest.raises(BadRecord):
    formats.to_kind(formats.parse({"prompt": "P", "completion": "C", "label": 0}), "pairs")


def test_pandalm_majority_excludes_ties(shared_dir):
  path = shared_dir / "data" / "pandalm-testset" / "testset-v1.json"
  recs = json.loads(path.read_text())
  majority = usable = 0
  for r in recs:  # independent count: some answer chosen by at least 2 of 3 annotators
    votes = [r["annotator1"], r["annotator2"], r["annotator3"]]
    if any(votes.count(c) >= 2 for c in (1, 2)):
      majority += 1
      a, b = str(r["response1"]), str(r["response2"])  # 6 answers are JSON booleans
      usable += bool(a.strip()) and bool(b.strip()) and a != b
  assert majority == 894
  with pytest.raises(data.DataError, match="record 19: field 'response1': empty response"):
    build_index(str(path), fmt="pandalm", policy="error")
  index = build_index(str(path), fmt="pandalm", policy="skip")
  assert len(index.items) == usable
  assert index.stats.counts["tie"] == 999 - 894
  first = next(r for r in recs if r["annotator1"] == r["annotator2"] == 2)
  ex = formats.parse(first, "pandalm")
  assert ex.responses == (first["response2"], first["response1"])


def test_llmbar_and_hhh_and_ultrafeedback(shared_dir):
  d = shared_dir / "data"
  nat = build_index(str(d / "llmbar/LLMBar/Natural/dataset.json"), fmt="llmbar")
  assert len(nat.items) == 100
  adv = build_index(str(d / "llmbar/LLMBar/Adversarial/*/dataset.json"), fmt="llmbar")
  assert len(adv.items) == 319
  hhh = build_index(str(d / "hhh-alignment/hhh_alignment.jsonl"), fmt="hhh")
  assert len(hhh.items) == 221
  uf = build_index(str(d / "ultrafeedback-binarized-sample/eval_clean.jsonl"))
  assert len(uf.items) + uf.stats.total() == 200


def test_real_hh_files_error_policy_names_empty_response(shared_dir):
  path = str(shared_dir / "data/hh-rlhf/helpful-base/test.jsonl.gz")
  with pytest.raises(data.DataError, match=r"line 121: field 'rejected': empty response"):
    build_index(path)
  index = build_index(path, policy="skip")
  assert index.num_records == 2354
  # 4 empty final turns; line 568 (chosen has extra turns) is kept via the common prefix.
  assert index.stats.counts == {"empty_response": 4, "identical": 2}


def test_explicit_prompt_that_is_an_hh_transcript():
  ex = formats.parse({"prompt": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:",
                      "chosen": " yes", "rejected": " no"})
  assert ex.prompt == (("user", "a"), ("assistant", "b"), ("user", "c"))
  assert ex.prompt_text.endswith("c\n\nAssistant:")
  plain = formats.parse({"prompt": "How are you?", "chosen": "a", "rejected": "b"})
  assert plain.prompt_text is None and plain.prompt == (("user", "How are you?"),)
