"""Text data files that start with a UTF-8 byte order mark."""
import gzip
import json

import pytest

from prefjax import data
from tests.data.conftest import config, pairs

BOM = b"\xef\xbb\xbf"


@pytest.mark.parametrize("name", ["p.jsonl", "p.jsonl.gz", "p_lines.json"])
@pytest.mark.parametrize("policy", ["error", "skip"])
def test_bom_jsonl_keeps_first_record(tmp_path, tok, name, policy):
  raw = BOM + "".join(json.dumps(r) + "\n" for r in pairs(4)).encode()
  path = tmp_path / name
  path.write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
  pipe = data.make_pipeline(config(str(path), on_bad_record=policy), tok)
  assert pipe.info.num_items == 4 and not pipe.dropped.counts


def test_bom_json_array(tmp_path, tok):
  path = tmp_path / "a.json"
  path.write_bytes(BOM + json.dumps(pairs(3)).encode())
  pipe = data.make_pipeline(config(str(path)), tok)
  assert pipe.info.num_items == 3 and not pipe.dropped.counts
