"""Batch layouts of docs/internals.md, checked against the padded layout by independent loops."""
import numpy as np
import pytest

from prefjax import data
from tests.data.conftest import config, write_jsonl

KEYS = ("tokens", "targets", "loss_mask", "positions")


def _records(n):
  return [{"prompt": f"question number {i} " + "word " * (i % 9),
           "chosen": "fine answer " + "yes " * (i % 11), "rejected": "poor " + "no " * (i % 6),
           **({"margin": float(i % 3)} if i % 2 else {})} for i in range(n)]


def _padded_pairs(path, tok, **kw):
  """prompt-or-not -> {(tokens of chosen, tokens of rejected)} from the padded layout."""
  cfg = config(path, batch_size=1, shuffle=False, num_epochs=1, **kw)
  out = {}
  for b in data.make_pipeline(cfg, tok):
    seqs = []
    for k in range(2):
      real = b["segment_ids"][0, k] > 0
      seqs.append({key: b[key][0, k][real] for key in KEYS})
    out[tuple(seqs[0]["tokens"]) + (-1,) + tuple(seqs[1]["tokens"])] = seqs
  return out


def test_padded_layout_shapes_margin_and_masks(tmp_path, tok):
  path = write_jsonl(tmp_path / "p.jsonl", _records(10))
  b = next(data.make_pipeline(config(path, shuffle=False), tok))
  assert {k: v.shape for k, v in b.items()} == {
      **{k: (4, 2, 64) for k in KEYS + ("segment_ids",)}, "margin": (4,)}
  np.testing.assert_array_equal(b["margin"], [0, 1, 0, 0])
  for i in range(4):
    for k in range(2):
      seg = b["segment_ids"][i, k]
      n = int(seg.sum())
      assert set(np.unique(seg)) <= {0, 1} and seg[:n].all()
      np.testing.assert_array_equal(b["targets"][i, k, :n - 1], b["tokens"][i, k, 1:n])
      assert b["loss_mask"][i, k, n - 1:].sum() == 0
      assert b["targets"][i, k, n - 2] == tok.eos_id and b["loss_mask"][i, k, n - 2] == 1


def _packed_sequences(batches, shared):
  """Reassembles each (row, pair, half) into a sequence dict, by a plain loop over tokens."""
  pairs = []
  for b in batches:
    rows, length = b["tokens"].shape
    for r in range(rows):
      for p in range(b["pair_mask"].shape[1]):
        if b["pair_mask"][r, p] == 0:
          continue
        seqs = []
        for half in (1, 2):
          idx = []
          for t in range(length):
            if shared:
              if b["segment_ids"][r, t] == p + 1 and b["branch_ids"][r, t] in (0, half):
                idx.append(t)
            elif b["segment_ids"][r, t] == 2 * p + half:
              idx.append(t)
          seqs.append({k: b[k][r, idx] for k in KEYS})
        pairs.append(seqs)
  return pairs


@pytest.mark.parametrize("layout", ["packed", "prompt_shared"])
def test_packed_layouts_hold_the_same_pairs_as_padded(tmp_path, tok, layout):
  path = write_jsonl(tmp_path / "p.jsonl", _records(23))
  lim = dict(max_prompt_len=20, max_response_len=16)
  padded = _padded_pairs(path, tok, max_len=36, **lim)
  cfg = config(path, layout=layout, max_len=72, batch_size=3, max_pairs_per_row=4, eval=path,
               **lim)
  batches = list(data.make_pipeline(cfg, tok, split="eval"))  # one pass, last batch padded
  got = _packed_sequences(batches, shared=layout == "prompt_shared")
  assert len(got) == len(padded) == 23
  for seqs in got:
    key = tuple(seqs[0]["tokens"]) + (-1,) + tuple(seqs[1]["tokens"])
    want = padded[key]
    for k in range(2):
      for name in ("targets", "loss_mask", "positions"):
        if layout == "prompt_shared" and name == "targets":
          # Shared tokens: the next prompt token; in a branch: the next token of the branch.
          continue
        np.testing.assert_array_equal(seqs[k][name], want[k][name], err_msg=f"{name} {k}")
      assert seqs[k]["loss_mask"].sum() == want[k]["loss_mask"].sum()
  for b in batches:
    real = b["segment_ids"] > 0
    assert (b["tokens"][~real] == 0).all() and (b["loss_mask"][~real] == 0).all()
    if layout == "prompt_shared":
      assert (b["loss_mask"][b["branch_ids"] == 0] == 0).all()
    # pair_mask is a prefix of ones and matches the segments present.
    for r in range(b["tokens"].shape[0]):
      n = int(b["pair_mask"][r].sum())
      assert (b["pair_mask"][r, :n] == 1).all()
      top = b["segment_ids"][r].max()
      assert top == (n if layout == "prompt_shared" else 2 * n)


def test_prompt_shared_targets_and_positions_exact(tmp_path, tok):
  path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi", "chosen": "Yo", "rejected": "No"}])
  cfg = config(path, layout="prompt_shared", batch_size=1, max_len=32, shuffle=False,
               num_epochs=1)
  b = next(data.make_pipeline(cfg, tok))
  p = [1, 28705, 13, 13, 28769, 6366, 28747, 15359, 13, 13, 7226, 11143, 28747]
  c, r = [627, 28709, 2], [1770, 2]
  n = len(p) - 1
  want_tokens = p[:-1] + [p[-1]] + c + [p[-1]] + r
  assert b["tokens"][0, :len(want_tokens)].tolist() == want_tokens
  assert b["branch_ids"][0, :len(want_tokens)].tolist() == [0] * n + [1] * 4 + [2] * 3
  assert b["positions"][0, :len(want_tokens)].tolist() == list(range(n)) + [n, n + 1, n + 2, n + 3] + [
      n, n + 1, n + 2]
  assert b["targets"][0, :len(want_tokens)].tolist() == p[1:] + c + [0] + r + [0]
  assert b["loss_mask"][0, :len(want_tokens)].tolist() == [0] * n + [1, 1, 1, 0, 1, 1, 0]
  assert b["segment_ids"][0, :len(want_tokens)].tolist() == [1] * len(want_tokens)
  assert b["pair_mask"][0].tolist() == [1] + [0] * 7


def test_unpaired_kl_batch_uses_next_examples_completion(tmp_path, tok):
  recs = [{"prompt": f"p{i}", "completion": f"c{i}", "label": i % 2} for i in range(4)]
  path = write_jsonl(tmp_path / "u.jsonl", recs)
  b = next(data.make_pipeline(config(path, kind="unpaired", shuffle=False), tok))
  assert b["tokens"].shape == (4, 64) and b["kl_tokens"].shape == (4, 64)
  np.testing.assert_array_equal(b["label"], [0, 1, 0, 1])
  for i in range(4):
    text = tok.decode(b["kl_tokens"][i][b["kl_segment_ids"][i] > 0])
    assert f"p{i}" in text and f"c{(i + 1) % 4}" in text and f"c{i}" not in text
    assert b["kl_loss_mask"][i].sum() == b["loss_mask"][(i + 1) % 4].sum()


def test_unpaired_from_pairs_gives_two_items_per_pair(tmp_path, tok):
  path = write_jsonl(tmp_path / "p.jsonl", _records(3))
  pipe = data.make_pipeline(config(path, kind="unpaired", batch_size=6, shuffle=False), tok)
  b = next(pipe)
  assert pipe.info.num_items == 6 and sorted(b["label"].tolist()) == [0, 0, 0, 1, 1, 1]


def test_sft_and_rankings(tmp_path, tok):
  path = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "p", "completion": "c"}] * 4)
  b = next(data.make_pipeline(config(path, kind="sft"), tok))
  assert set(b) == {"tokens", "targets", "loss_mask", "positions", "segment_ids"}
  assert b["tokens"].shape == (4, 64)
  recs = [{"prompt": "p", "responses": ["a", "b", "c", "d", "e"], "scores": [1, 5, 3, 2, 4]},
          {"prompt": "q", "responses": ["x", "y"], "ranks": [2, 1]}] * 2
  path = write_jsonl(tmp_path / "r.jsonl", recs)
  b = next(data.make_pipeline(config(path, kind="rankings", max_responses=3, shuffle=False), tok))
  assert b["tokens"].shape == (4, 3, 64)
  np.testing.assert_array_equal(b["scores"][0], [5, 4, 3])
  np.testing.assert_array_equal(b["response_mask"], [[1, 1, 1], [1, 1, 0]] * 2)
  np.testing.assert_array_equal(b["scores"][1], [-1, -2, 0])
  assert tok.decode(b["tokens"][1, 0][b["segment_ids"][1, 0] > 0]).endswith("y")
