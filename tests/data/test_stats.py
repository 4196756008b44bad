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
