"""Sources: JSONL(.gz), JSON arrays, Parquet, ArrayRecord, globs; thread-safe random access."""
import concurrent.futures
import json

import pyarrow as pa
import pyarrow.parquet as pq

from prefjax import data
from prefjax.data.sources import RecordSource, expand_paths
from tests.data.conftest import config, pairs, write_jsonl


def _expected_prompts(recs):
  return sorted(r["prompt"] for r in recs)


def test_all_file_types_give_the_same_records(tmp_path):
  recs = pairs(7)
  paths = [write_jsonl(tmp_path / "a.jsonl", recs), write_jsonl(tmp_path / "b.jsonl.gz", recs,
                                                                gz=True)]
  (tmp_path / "c.json").write_text(json.dumps(recs))
  paths.append(str(tmp_path / "c.json"))
  pq.write_table(pa.Table.from_pylist(recs), tmp_path / "d.parquet")
  paths.append(str(tmp_path / "d.parquet"))
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  w = array_record_module.ArrayRecordWriter(str(tmp_path / "e.array_record"), "group_size:1")
  for r in recs:
    w.write(json.dumps(r).encode())
  w.close()
  paths.append(str(tmp_path / "e.array_record"))
  for p in paths:
    src = RecordSource([p])
    assert len(src) == 7, p
    assert [src[i] for i in range(7)] == recs, p
  assert expand_paths(str(tmp_path / "*.json*")) == sorted(paths[:3])


def test_blank_lines_and_line_numbers(tmp_path):
  path = tmp_path / "x.jsonl"
  path.write_text('\n{"prompt": "a", "chosen": "b", "rejected": "c"}\n\n{"x": 1}\r\n')
  src = RecordSource([str(path)])
  assert len(src) == 2 and src.where(1) == (str(path), "line 4") and src[1] == {"x": 1}


def test_concurrent_reads_are_exact(tmp_path):
  recs = pairs(300)
  src = RecordSource([write_jsonl(tmp_path / "a.jsonl", recs)])
  order = [(i * 37) % 300 for i in range(3000)]
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    got = list(pool.map(lambda i: src[i], order))
  assert got == [recs[i] for i in order]


def test_pipeline_over_a_glob_of_mixed_files(tmp_path, tok):
  write_jsonl(tmp_path / "a.jsonl", pairs(5, prefix="a"))
  pq.write_table(pa.Table.from_pylist(pairs(3, prefix="b")), tmp_path / "b.parquet")
  cfg = config(str(tmp_path / "*"), batch_size=8, shuffle=False, num_epochs=1)
  pipe = data.make_pipeline(cfg, tok)
  assert pipe.info.num_items == 8 and len(list(pipe)) == 1


def test_tfds_spec_without_tensorflow_datasets(tok):
  try:
    import tensorflow_datasets  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    pass
  else:
    import pytest  # pylint: disable=g-import-not-at-top
    pytest.skip("tensorflow_datasets is installed")
  import pytest  # pylint: disable=g-import-not-at-top
  with pytest.raises(data.DataError, match="tensorflow_datasets is not installed"):
    data.make_pipeline(config("tfds:hh_rlhf:train"), tok)


def test_hugging_face_save_to_disk_folder(tmp_path, tok):
  import pytest  # pylint: disable=g-import-not-at-top
  datasets = pytest.importorskip("datasets")
  recs = pairs(6)
  datasets.Dataset.from_list(recs).save_to_disk(str(tmp_path / "hf"))
  src = RecordSource(expand_paths(str(tmp_path / "hf")))
  assert [src[i] for i in range(len(src))] == recs
  datasets.DatasetDict({"train": datasets.Dataset.from_list(recs)}).save_to_disk(
      str(tmp_path / "dd"))
  with pytest.raises(data.DataError, match="DatasetDict"):
    expand_paths(str(tmp_path / "dd"))
  assert len(expand_paths(str(tmp_path / "dd" / "train"))) == 1
  with pytest.raises(data.DataError, match="is a directory"):
    expand_paths(str(tmp_path))
