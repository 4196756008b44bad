"""Shuffling, epochs, per-process shards, eval passes, the 80/20 split and exact resume."""
import collections

from absl import flags
import numpy as np
import pytest

from prefjax import data
from prefjax.data.index import split_value
from tests.data.conftest import config, pairs, write_jsonl


def _first_tokens(batch):
  """A key per example: its chosen tokens (unique per record in these tests)."""
  t = batch["tokens"][:, 0]
  return [tuple(row[row > 0]) for row in t]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_epochs_shuffle_and_coverage(tmp_path, tok):
  path = write_jsonl(tmp_path / "a.jsonl", pairs(12))
  pipe = data.make_pipeline(config(path, num_epochs=2, batch_size=4), tok, seed=3)
  batches = list(pipe)
  assert len(batches) == 6
  seen = [k for b in batches for k in _first_tokens(b)]
  epoch1, epoch2 = seen[:12], seen[12:]
  assert len(set(epoch1)) == 12 and set(epoch1) == set(epoch2) and epoch1 != epoch2
  again = [k for b in data.make_pipeline(config(path, num_epochs=2, batch_size=4), tok, seed=3)
           for k in _first_tokens(b)]
  other = [k for b in data.make_pipeline(config(path, num_epochs=2, batch_size=4), tok, seed=4)
           for k in _first_tokens(b)]
  assert again == seen and other != seen


def test_infinite_repeat(tmp_path, tok):
  path = write_jsonl(tmp_path / "a.jsonl", pairs(5))
  pipe = data.make_pipeline(config(path, num_epochs=None, batch_size=2), tok)
  assert len([next(pipe) for _ in range(20)]) == 20  # 40 examples out of 5 records


def test_process_shards_are_disjoint_and_cover(tmp_path, tok):
  path = write_jsonl(tmp_path / "a.jsonl", pairs(17))
  cfg = config(path, num_epochs=1, batch_size=4)
  shards = []
  for i in range(2):
    pipe = data.make_pipeline(cfg, tok, process_index=i, process_count=2)
    batches = list(pipe)
    assert all(b["tokens"].shape[0] == 2 for b in batches)  # local batch = 4 / 2
    assert len(batches) == 4  # 8 items per process (17 // 2), 2 per local batch
    shards.append({k for b in batches for k in _first_tokens(b)})
  assert not shards[0] & shards[1] and len(shards[0] | shards[1]) == 16
  with pytest.raises(ValueError, match="multiple of the process count"):
    data.make_pipeline(config(path, batch_size=3), tok, process_index=0, process_count=2)


def test_eval_pass_in_order_with_padded_last_batch(tmp_path, tok):
  recs = pairs(10)
  path = write_jsonl(tmp_path / "a.jsonl", recs)
  cfg = config(path, eval={"a": path, "b": path}, batch_size=4)
  assert data.eval_names(cfg) == ["a", "b"]
  batches = list(data.make_pipeline(cfg, tok, split="b"))
  assert len(batches) == 3
  mask = np.concatenate([b["example_mask"] for b in batches])
  np.testing.assert_array_equal(mask, [1] * 10 + [0, 0])
  prompts = [tok.decode(b["tokens"][i, 0][b["loss_mask"][i, 0] == 0][:12]) for b in batches
             for i in range(4)]
  for i, r in enumerate(recs):
    assert r["prompt"] in prompts[i]
  assert (batches[-1]["segment_ids"][2:] == 0).all()
  # Three processes: equal batch counts; padding items are masked; every item seen once.
  cfg.eval_batch_size = 3
  seen = []
  for i in range(3):
    got = list(data.make_pipeline(cfg, tok, split="a", process_index=i, process_count=3))
    assert len(got) == 4 and all(b["tokens"].shape[0] == 1 for b in got)  # ceil(10 / 3) = 4
    seen += [k for b in got if b["example_mask"][0] for k in _first_tokens(b)]
  assert len(seen) == 10 and len(set(seen)) == 10


def test_holdout_split_by_first_human_turn(tmp_path, tok):
  recs = []
  for i in range(60):  # 3 records share each first turn, like HH
    first = f"first question {i // 3}"
    recs.append({"chosen": f"\n\nHuman: {first}\n\nAssistant: ok\n\nHuman: more {i}"
                           f"\n\nAssistant: yes {i}",
                 "rejected": f"\n\nHuman: {first}\n\nAssistant: ok\n\nHuman: more {i}"
                             f"\n\nAssistant: no {i}"})
  path = write_jsonl(tmp_path / "hh.jsonl", recs)
  cfg = config(path, split_fraction=0.8, batch_size=1, num_epochs=1, shuffle=False)
  texts = {}
  for split in ("train", "eval"):
    pipe = data.make_pipeline(cfg, tok, split=split)
    texts[split] = [tok.decode(b["tokens"][0, 0][b["segment_ids"][0, 0] > 0]) for b in pipe]
  firsts = {s: {t.split("\n\nHuman: ")[1].split("\n\n")[0] for t in v} for s, v in texts.items()}
  assert not firsts["train"] & firsts["eval"]
  want_train = sum(3 for g in range(20) if split_value(f"first question {g}") < 0.8)
  assert len(texts["train"]) == want_train and len(texts["eval"]) == 60 - want_train
  assert 0 < len(texts["eval"]) < 30
  cfg2 = config(path, holdout=0.2, batch_size=1, num_epochs=1, shuffle=False)
  assert data.make_pipeline(cfg2, tok).info.num_items == want_train


def test_resume_get_state_set_state(tmp_path, tok):
  path = write_jsonl(tmp_path / "a.jsonl", pairs(30))
  for layout, extra in (("padded", {}), ("packed", {"max_len": 96})):
    cfg = config(path, layout=layout, num_epochs=None, batch_size=2, **extra)
    pipe = data.make_pipeline(cfg, tok, seed=7)
    for _ in range(9):  # mid-epoch (and past one epoch for packed rows)
      next(pipe)
    state = pipe.get_state()
    want = [next(pipe) for _ in range(5)]
    fresh = data.make_pipeline(cfg, tok, seed=7)
    fresh.set_state(state)
    _assert_batches_equal([next(fresh) for _ in range(5)], want)


def test_resume_through_orbax(tmp_path, tok):
  import grain  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = write_jsonl(tmp_path / "a.jsonl", pairs(30))
  cfg = config(path, batch_size=4)
  pipe = data.make_pipeline(cfg, tok, seed=1)
  for _ in range(4):
    next(pipe)
  mngr = ocp.CheckpointManager(tmp_path / "ckpt")
  mngr.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(pipe)))
  mngr.wait_until_finished()
  want = [next(pipe) for _ in range(5)]
  fresh = data.make_pipeline(cfg, tok, seed=1)
  mngr.restore(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  _assert_batches_equal([next(fresh) for _ in range(5)], want)
  mngr.close()


def test_resume_with_two_worker_processes(tmp_path, tok):
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(["test"])
  path = write_jsonl(tmp_path / "a.jsonl", pairs(40))
  cfg = config(path, batch_size=2, worker_count=2)
  pipe = data.make_pipeline(cfg, tok, seed=5)
  for _ in range(7):
    next(pipe)
  state = pipe.get_state()
  want = [next(pipe) for _ in range(5)]
  pipe.close()
  fresh = data.make_pipeline(cfg, tok, seed=5)
  fresh.set_state(state)
  got = [next(fresh) for _ in range(5)]
  fresh.close()
  _assert_batches_equal(got, want)
  keys = collections.Counter(k for b in want for k in _first_tokens(b))
  assert len(keys) == 10


@pytest.mark.parametrize("kw", [dict(), dict(layout="packed"), dict(layout="prompt_shared"),
                                dict(kind="sft"), dict(kind="unpaired")])
def test_batch_shapes_are_the_pipelines(tmp_path, tok, kw):
  """`data.batch_shapes` (no data read) gives the global batch the pipeline yields, per
  process count: what `prefjax.aot` compiles the train step for."""
  path = write_jsonl(tmp_path / "a.jsonl", pairs(12))
  cfg = config(path, batch_size=4, **kw)
  for procs in (1, 2):
    local = next(iter(data.make_pipeline(cfg, tok, process_index=0, process_count=procs)))
    want = {k: ((v.shape[0] * procs,) + v.shape[1:], v.dtype) for k, v in local.items()}
    assert data.batch_shapes(cfg, process_count=procs) == want
