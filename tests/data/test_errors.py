"""The bad-input matrix: one clear DataError (file, line, field) or skip-and-count."""
import gzip
import json

import pytest

from prefjax import data
from tests.data.conftest import config, pairs, write_jsonl

GOOD = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})

# name -> (bad line, reason, field or None, line number in the message)
LINE_CASES = {
    "truncated_json": ('{"prompt": "p", "chosen": "a", "rej', "invalid_json", None),
    "missing_field": ('{"prompt": "p", "chosen": "a"}', "missing_field", "rejected"),
    "wrong_type": ('{"prompt": "p", "chosen": 3, "rejected": "b"}', "wrong_type", "chosen"),
    "non_object": ('["prompt", "chosen"]', "not_object", None),
    "empty_response": ('{"prompt": "p", "chosen": "  ", "rejected": "b"}', "empty_response",
                       "chosen"),
    "bad_messages": ('{"chosen": [{"role": "user"}], "rejected": []}', "wrong_type", "chosen"),
    "nan_margin": ('{"prompt": "p", "chosen": "a", "rejected": "b", "margin": NaN}',
                   "non_finite", "margin"),
    "inf_margin": ('{"prompt": "p", "chosen": "a", "rejected": "b", "margin": -Infinity}',
                   "non_finite", "margin"),
}


def _write_with_bad_line(tmp_path, bad: bytes, gz=False) -> str:
  raw = (GOOD + "\n" + GOOD.replace('"a"', '"c"') + "\n").encode() + bad + b"\n" + (
      GOOD.replace('"a"', '"d"') + "\n").encode()
  path = tmp_path / ("bad.jsonl.gz" if gz else "bad.jsonl")
  path.write_bytes(gzip.compress(raw) if gz else raw)
  return str(path)


@pytest.mark.parametrize("name", sorted(LINE_CASES))
def test_bad_line_error_names_file_line_field(tmp_path, tok, name):
  bad, reason, field = LINE_CASES[name]
  path = _write_with_bad_line(tmp_path, bad.encode())
  with pytest.raises(data.DataError) as e:
    data.make_pipeline(config(path), tok)
  msg = str(e.value)
  assert isinstance(e.value, ValueError)
  assert path in msg and "line 3" in msg and e.value.reason == reason
  if field:
    assert repr(field) in msg
  assert e.value.__context__ is None or not isinstance(e.value.__context__, json.JSONDecodeError)


@pytest.mark.parametrize("name", sorted(LINE_CASES))
def test_bad_line_skip_counts_and_continues(tmp_path, tok, name):
  bad, reason, _ = LINE_CASES[name]
  path = _write_with_bad_line(tmp_path, bad.encode(), gz=True)
  pipe = data.make_pipeline(config(path, on_bad_record="skip", batch_size=3, num_epochs=1), tok)
  assert pipe.info.num_items == 3 and pipe.dropped.counts == {reason: 1}
  assert pipe.dropped.examples[reason] == [f"{path} line 3"]
  assert len(list(pipe)) == 1


def test_invalid_utf8(tmp_path, tok):
  path = _write_with_bad_line(tmp_path, b'{"prompt": "p\xff\xfe", "chosen": "a", "rejected": "b"}')
  with pytest.raises(data.DataError, match=r"line 3.*invalid UTF-8"):
    data.make_pipeline(config(path), tok)
  pipe = data.make_pipeline(config(path, on_bad_record="skip"), tok)
  assert pipe.dropped.counts == {"invalid_utf8": 1}


def test_corrupt_gzip(tmp_path, tok):
  path = tmp_path / "c.jsonl.gz"
  path.write_bytes(gzip.compress(("\n".join([GOOD] * 50)).encode())[:-30])
  with pytest.raises(data.DataError, match="corrupt gzip") as e:
    data.make_pipeline(config(str(path)), tok)
  assert str(path) in str(e.value)
  good = write_jsonl(tmp_path / "g.jsonl", pairs(4))
  pipe = data.make_pipeline(config([str(path), good], on_bad_record="skip"), tok)
  assert pipe.dropped.counts == {"corrupt_file": 1} and pipe.info.num_items == 4


def test_missing_path_and_empty_glob(tmp_path, tok):
  for policy in ("error", "skip"):
    with pytest.raises(data.DataError, match="does not exist"):
      data.make_pipeline(config(str(tmp_path / "nope.jsonl"), on_bad_record=policy), tok)
    with pytest.raises(data.DataError, match="glob matched no files"):
      data.make_pipeline(config(str(tmp_path / "*.parquet"), on_bad_record=policy), tok)


def test_empty_file(tmp_path, tok):
  path = tmp_path / "e.jsonl"
  path.write_text("\n  \n")
  with pytest.raises(data.DataError, match="holds no records") as e:
    data.make_pipeline(config(str(path)), tok)
  assert e.value.reason == "empty_file" and str(path) in str(e.value)
  with pytest.raises(data.DataError, match="no usable pairs"):
    data.make_pipeline(config(str(path), on_bad_record="skip"), tok)


def test_file_with_no_usable_pair(tmp_path, tok):
  path = write_jsonl(tmp_path / "n.jsonl", [{"prompt": "p", "chosen": "x", "rejected": "x"}] * 3)
  for policy in ("error", "skip"):
    with pytest.raises(data.DataError, match="no usable pairs") as e:
      data.make_pipeline(config(path, on_bad_record=policy), tok)
    assert "identical" in str(e.value) and path in str(e.value)


def test_identical_pairs_dropped_under_both_policies(tmp_path, tok):
  recs = pairs(4) + [{"prompt": "p", "chosen": "same", "rejected": "same"}]
  path = write_jsonl(tmp_path / "i.jsonl", recs)
  for policy in ("error", "skip"):
    pipe = data.make_pipeline(config(path, on_bad_record=policy), tok)
    assert pipe.info.num_items == 4 and pipe.dropped.counts == {"identical": 1}
    assert pipe.dropped.examples["identical"] == [f"{path} line 5"]


def test_overlong_record_is_truncated_not_fatal(tmp_path, tok):
  recs = [{"prompt": "long " * 500, "chosen": "yes " * 500, "rejected": "no " * 400}]
  path = write_jsonl(tmp_path / "l.jsonl", recs)
  b = next(data.make_pipeline(config(path, batch_size=1), tok))
  assert b["tokens"].shape == (1, 2, 64) and (b["segment_ids"] > 0).sum() == 2 * 48
  assert b["tokens"][0, 0, 0] == tok.bos_id


def test_json_array_error_and_bad_element(tmp_path, tok):
  path = tmp_path / "a.json"
  path.write_text('[{"input": "q", "output_1": "a", "output_2": "b", "label": 1},\n 7]')
  with pytest.raises(data.DataError, match="record 2"):
    data.make_pipeline(config(str(path), format="llmbar"), tok)
  path.write_text('[{"input": "q",\n "output_1": ')
  with pytest.raises(data.DataError, match="line 2"):
    data.make_pipeline(config(str(path), format="llmbar"), tok)


def test_bad_policy_name(tmp_path, tok):
  path = write_jsonl(tmp_path / "g.jsonl", pairs(4))
  with pytest.raises(ValueError, match="on_bad_record"):
    data.make_pipeline(config(path, on_bad_record="ignore"), tok)


def test_corrupt_parquet(tmp_path, tok):
  path = tmp_path / "x.parquet"
  path.write_bytes(b"PAR1 this is not parquet")
  with pytest.raises(data.DataError, match="cannot read parquet") as e:
    data.make_pipeline(config(str(path)), tok)
  assert e.value.reason == "corrupt_file" and str(path) in str(e.value)


def test_non_finite_ranking_score_is_a_bad_record(tmp_path, tok):
  """A NaN score would silently mis-rank the responses: it is refused at startup."""
  good = {"prompt": "p", "responses": ["a", "b", "c"], "scores": [1.0, 3.0, 2.0]}
  lines = [json.dumps(good), '{"prompt": "q", "responses": ["a", "b"], "scores": [1.0, NaN]}']
  path = tmp_path / "rank.jsonl"
  path.write_text("\n".join(lines) + "\n")
  with pytest.raises(data.DataError) as e:
    data.make_pipeline(config(str(path), kind="rankings", format="rankings"), tok)
  assert e.value.reason == "non_finite" and "line 2" in str(e.value) and "'scores'" in str(e.value)
