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


def _hh_texts():
  import os  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(data.__file__), "..", "assets", "data",
                      "hh_rlhf_helpful_base", "test.jsonl.gz")
  with gzip.open(path, "rt", encoding="utf-8") as f:
    return [json.loads(line)["chosen"] for _, line in zip(range(60), f)]


@pytest.mark.parametrize("which", ["tok", "gemma_tok"])
def test_cutting_long_texts_before_tokenizing_gives_the_same_tokens(request, which):
  """encode() with limits cuts huge texts first; the truncated tokens equal those of the whole
  text (HH transcripts repeated to ~200k characters, and whitespace runs)."""
  from prefjax.data import formats, templates, tokenize  # pylint: disable=g-import-not-at-top
  tk = request.getfixturevalue(which)
  limits = tokenize.Limits(max_len=96, max_prompt_len=48, max_response_len=48)
  template = templates.get_template("hh")
  texts = _hh_texts()
  n_cut = 0
  for i, text in enumerate(texts):
    long = (text + " " * (i % 40) + "\n") * 60
    ex = formats.Example(kind="pairs", prompt=(("user", long),), prompt_text=None,
                         responses=(long, texts[i - 1] * 50))
    whole = tokenize.truncate(tokenize.encode(ex, tk, template), limits, keep_bos=True)
    cut = tokenize.truncate(tokenize.encode(ex, tk, template, limits), limits, keep_bos=True)
    assert (cut.prompt, cut.responses, cut.truncated) == (whole.prompt, whole.responses,
                                                          whole.truncated), i
    n_cut += len(long) > tokenize.char_budget(tk, limits.max_response_len)
  assert n_cut == len(texts)


def test_a_50mb_record_costs_memory_in_proportion_to_the_budget(tmp_path):
  """Peak RSS of a pipeline reading one 50 MB response: was 5.1 GB; now the record is parsed
  and cut (about 0.1 GB above the 0.35 GB baseline per reader thread holding it; measured 0.45
  to 1.1 GB with the default 2 threads), never tokenized whole."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from tests.train import loop_helpers as lh  # pylint: disable=g-import-not-at-top
  big = tmp_path / "big.jsonl"
  recs = pairs(3) + [{"prompt": "p", "chosen": "word " * 10_000_000, "rejected": "b"}]
  big.write_text("".join(json.dumps(r) + "\n" for r in recs))
  code = ("import resource\n"
          "from tests.data.conftest import config\nfrom prefjax import data\n"
          f"pipe = data.make_pipeline(config({str(big)!r}), data.load_tokenizer('mistral_v1'))\n"
          "next(iter(pipe))\n"
          "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)\n")
  r = subprocess.run([sys.executable, "-c", code], cwd=str(lh.REPO), capture_output=True,
                     text=True, timeout=300, check=False)
  assert r.returncode == 0, r.stderr[-2000:]
  assert int(r.stdout.strip().splitlines()[-1]) < 1600
