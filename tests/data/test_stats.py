"""The statistics behind `python -m prefjax.data.inspect` and the padding report."""
from prefjax.data.stats import length_stats, padding_fraction
from tests.data.conftest import config, write_jsonl


def test_length_stats_and_padding(tmp_path, tok):
  recs = [{"prompt": "p " * (i + 1), "chosen": "yes " * (3 * i + 1), "rejected": "no"}
          for i in range(12)] + [{"prompt": "x", "chosen": "", "rejected": "y"}]
  path = write_jsonl(tmp_path / "a.jsonl", recs)
  cfg = config(path, on_bad_record="skip", max_len=40, max_prompt_len=16, max_response_len=20)
  st = length_stats(cfg, tok)
  assert st["records"] == 13 and st["usable"] == 12
  assert st["dropped"]["counts"] == {"empty_response": 1}
  # Responses of 3i+1 words (+EOS) exceed 20 tokens from i = 7 on.
  assert 0 < st["truncation_rate"] < 1
  pad = padding_fraction(cfg, tok, layout="padded", batch_size=4)
  assert pad["pairs"] == 12 and pad["slots"] == 3 * 4 * 2 * 40
  assert 0 < pad["padding_fraction"] < 1
  packed = padding_fraction(cfg, tok, layout="packed", max_len=80, batch_size=2)
  assert packed["padding_fraction"] < pad["padding_fraction"]


def test_inspect_cli_prints_json(tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  recs = [{"prompt": f"q{i}", "chosen": "yes " * i + "ok", "rejected": "no"} for i in range(10)]
  path = write_jsonl(tmp_path / "a.jsonl", recs)
  root = pathlib.Path(__file__).resolve().parents[2]
  out = subprocess.run([sys.executable, "-m", "prefjax.data.inspect", f"--train={path}",
                        "--max_len=32", "--max_prompt_len=12", "--max_response_len=16",
                        "--batch_size=2", "--num_examples=1"],
                       cwd=root, capture_output=True, text=True, timeout=120, check=True)
  report = json.loads(out.stdout[:out.stdout.index("\n}\n") + 2])
  assert report["records"] == 10 and report["usable"] == 10
  assert [p["layout"] for p in report["padding"]] == ["padded", "packed", "prompt_shared",
                                                      "prompt_shared"]
  assert '"loss_on"' in out.stdout
