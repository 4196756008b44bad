"""Exact ids, masks and truncation on tiny records (hand-written expectations)."""
import numpy as np
import pytest

from prefjax import data
from prefjax.data import formats, templates
from prefjax.data.tokenize import Limits, Tokenized, encode, sequence, truncate
from tests.data.conftest import config, write_jsonl

# Mistral-v1 pieces (SentencePiece ids, checked by hand with sp.encode):
HH_PROMPT_HI = [28705, 13, 13, 28769, 6366, 28747, 15359, 13, 13, 7226, 11143, 28747]
YO, NO = [627, 28709], [1770]
BOS, EOS = 1, 2


def test_hh_template_ids_and_padded_masks(tmp_path, tok):
  path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "Hi", "chosen": "Yo", "rejected": "No"}])
  cfg = config(path, batch_size=1, max_len=20, max_prompt_len=16, max_response_len=4,
               shuffle=False, num_epochs=1)
  b = next(data.make_pipeline(cfg, tok))
  p = [BOS] + HH_PROMPT_HI                       # 13 tokens
  for k, resp in enumerate((YO + [EOS], NO + [EOS])):
    seq = p + resp
    n = len(seq)
    want_tokens = np.zeros(20, np.int32)
    want_tokens[:n] = seq
    want_targets = np.zeros(20, np.int32)
    want_targets[:n - 1] = seq[1:]
    want_mask = np.zeros(20, np.float32)
    for t in range(20):  # target t is a response token (incl. EOS)
      if len(p) <= t + 1 < n:
        want_mask[t] = 1.0
    np.testing.assert_array_equal(b["tokens"][0, k], want_tokens)
    np.testing.assert_array_equal(b["targets"][0, k], want_targets)
    np.testing.assert_array_equal(b["loss_mask"][0, k], want_mask)
    np.testing.assert_array_equal(b["positions"][0, k][:n], np.arange(n))
    np.testing.assert_array_equal(b["segment_ids"][0, k], (np.arange(20) < n).astype(np.int32))
    assert b["loss_mask"][0, k].sum() == len(resp)
  assert b["tokens"].dtype == np.int32 and b["loss_mask"].dtype == np.float32


def test_gemma_template_exact_ids(gemma_tok):
  tpl = templates.get_template("gemma")
  ex = formats.Example("pairs", (("user", "Hi"),), ("Hello", "Hi there"))
  t = encode(ex, gemma_tok, tpl)
  # <bos> <start_of_turn> user \n Hi <end_of_turn> \n <start_of_turn> model \n
  assert t.prompt == [2, 106, 1645, 108, 2151, 107, 108, 106, 2516, 108]
  # Hello <end_of_turn> \n <eos>
  assert t.responses == [[4521, 107, 108, 1], [2151, 1104, 107, 108, 1]]
  assert gemma_tok.family == "gemma" and gemma_tok.piece_id("<start_of_turn>") == 106


def test_gemma_system_turn_merged_and_multiturn(gemma_tok):
  tpl = templates.get_template("gemma")
  turns = (("system", "S"), ("user", "U1"), ("assistant", "A1"), ("user", "U2"))
  text = templates.render_prompt(tpl, turns)
  assert text == ("<start_of_turn>user\nS\n\nU1<end_of_turn>\n<start_of_turn>model\nA1"
                  "<end_of_turn>\n<start_of_turn>user\nU2<end_of_turn>\n<start_of_turn>model\n")
  ids = gemma_tok.encode(text, tpl.specials)
  assert ids.count(106) == 4 and ids.count(107) == 3


def test_llama3_template_text_and_absent_specials(tok):
  tpl = templates.get_template("llama3")
  text = templates.render_prompt(tpl, (("user", "Hi"),))
  assert text == ("<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n\n")
  # Not in the Mistral vocabulary: encoded as plain text, decodes back.
  assert tok.decode(tok.encode(text, tpl.specials)) == text


def test_hh_raw_transcript_prompt_kept_verbatim(tok):
  rec = {"chosen": "\n\nHuman: Hi\n\nAssistant: Yo", "rejected": "\n\nHuman: Hi\n\nAssistant: No"}
  ex = formats.parse(rec)
  assert ex.prompt_text == "\n\nHuman: Hi\n\nAssistant:" and ex.responses == ("Yo", "No")
  t = encode(ex, tok, templates.get_template("hh"))
  assert t.prompt == [BOS] + HH_PROMPT_HI and t.responses == [YO + [EOS], NO + [EOS]]


def test_truncation_rules():
  lim = Limits(max_len=10, max_prompt_len=5, max_response_len=6)
  t = truncate(Tokenized([1, 10, 11, 12, 13, 14, 15], [[20, 21, 22, 23, 24, 25, 26, 2], [30, 2]]),
               lim, keep_bos=True)
  assert t.prompt == [1, 12, 13, 14, 15]             # BOS kept, left cut
  assert t.responses == [[20, 21, 22, 23, 24], [30, 2]]  # right cut to 6, then to 10 - 5
  assert t.truncated
  t = truncate(Tokenized([1, 10], [[20, 2], [30, 2]]), lim, keep_bos=True)
  assert not t.truncated and t.prompt == [1, 10]
  packed = Limits(max_len=12, max_prompt_len=4, max_response_len=8, layout="packed")
  t = truncate(Tokenized([1, 10, 11], [[20] * 8, [30] * 3]), packed, keep_bos=True)
  assert 2 * 3 + sum(map(len, t.responses)) <= 12 and t.responses[1] == [30] * 3
  with pytest.raises(ValueError, match="leaves no room"):
    Limits(max_len=8, max_prompt_len=4, max_response_len=4, layout="packed").validate(2)


def test_sequence_arrays():
  s = sequence([1, 5, 6], [7, 2])
  np.testing.assert_array_equal(s["tokens"], [1, 5, 6, 7, 2])
  np.testing.assert_array_equal(s["targets"], [5, 6, 7, 2, 0])
  np.testing.assert_array_equal(s["loss_mask"], [0, 0, 1, 1, 0])


def test_identical_after_truncation_dropped_and_counted(tmp_path, tok):
  long = "same words here " * 10
  recs = [{"prompt": "p", "chosen": long + "A", "rejected": long + "B"},
          {"prompt": "p2", "chosen": "x", "rejected": "y"}]
  path = write_jsonl(tmp_path / "t.jsonl", recs)
  cfg = config(path, batch_size=1, max_response_len=8, shuffle=False, num_epochs=1)
  pipe = data.make_pipeline(cfg, tok)
  batches = list(pipe)
  assert len(batches) == 1
  assert pipe.dropped.counts["identical_after_truncation"] == 1


def test_gemma3_control_ids(shared_dir):
  tok3 = data.load_tokenizer(str(shared_dir / "tokenizers" / "gemma3" / "tokenizer.model"))
  tpl = templates.get_template("gemma")
  ids = tok3.encode_prompt(templates.render_prompt(tpl, (("user", "Hi"),)), tpl.specials)
  assert ids[:2] == [2, 105] and ids.count(105) == 2 and ids.count(106) == 1


def test_tokenizer_pickles_and_names(tok):
  import pickle  # pylint: disable=g-import-not-at-top
  again = pickle.loads(pickle.dumps(tok))
  assert again.encode("hello world") == tok.encode("hello world")
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 0, 32000)
  assert tok.family == "llama"
  with pytest.raises(FileNotFoundError):
    data.load_tokenizer("/nonexistent/tokenizer.model")
