"""The evaluation tasks end to end at the command line, on the data shipped with the package.

As a user runs them (docs/reproduction.md, scripts/reproduce_lin2024.sh), shrunk to seconds:

  quickstart.py:rm  -> explicit RM          quickstart.py -> DPO policy (precomputed reference
                                                             = its random init)
  eval_reward.py          RM on the held-out 20% of the shipped HH file ("|eval") and a slice's
                          train side tagged "ood"
  eval_implicit_reward.py DPO implicit reward beside the RM, ID/OOD summary and drop
  iterative_dpo.py        2 iterations from the DPO policy, annotated by the RM; re-run resumes
  generate.py             the DPO policy and the last iterative policy on held-out prompts,
                          scored by the RM

Every value read back is checked against something computed independently: the per-pair scores
in eval_scores.npz (accuracy, mean/std, margin), the trainers' own eval metrics on the first
held-out batch (same checkpoint, same pairs), the other eval task, the samples behind each
iteration's pairs, the JSONL rows behind each generation summary. Only the shipped HH file and
tokenizer are read (no ../shared). The model is smaller than the quick-start one (D=32, one
layer), so every task must read the architecture from the training run's config.json.
"""
import gzip
import json
import math
import os
import pathlib
import time

import numpy as np
import pytest

from tests.train import loop_helpers as lh

SHIPPED = lh.REPO / "prefjax" / "assets" / "data" / "hh_rlhf_helpful_base" / "test.jsonl.gz"
SLICE_RECORDS = 200  # first records of the shipped file: the cheap sets of eval_implicit_reward
STEPS = 4  # optimizer steps of the RM and DPO runs
ITER_STEPS, ITER_PROMPTS, K, NEW_TOKENS = 2, 8, 2, 8  # iterative DPO
GEN_PROMPTS = 4
PNG = b"\x89PNG\r\n\x1a\n"

# One CPU device in the subprocesses, as on a user's machine (tests/conftest.py asks for 8
# fake ones for the in-process tests); registered eval sets pointed at a missing folder, so a
# silent use of ../shared/data would fail.
_FLAGS = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                  if not f.startswith("--xla_force_host_platform_device_count"))
ENV = {"XLA_FLAGS": _FLAGS, "PREFJAX_SHARED_DATA": "/nonexistent/prefjax_shared_data"}

MODEL = {"model.embed_dim": 32, "model.hidden_dim": 64, "model.num_layers": 1,
         "model.head_dim": 8}  # quickstart: 64 / 256 / 2 / 16
LENGTHS = {"data.max_len": 64, "data.max_prompt_len": 32, "data.max_response_len": 32}
DATA = {"data.train": str(SHIPPED), "data.split_fraction": 0.8, "log.progress": False}


def _args(*parts: dict) -> list[str]:
  kv = {}
  for p in parts:
    kv.update(p)
  return [f"--config.{k}={v}" for k, v in kv.items()]


def _run(workdir, args, config) -> float:
  """Runs the CLI; fails the test with the stderr tail unless it exits 0; returns seconds."""
  t0 = time.perf_counter()
  r = lh.run_main(str(workdir), args, config=config, env_extra=ENV)
  dt = time.perf_counter() - t0
  print(f"{config} --workdir={workdir}: exit {r.returncode} in {dt:.1f}s")
  if r.returncode != 0:
    pytest.fail(f"{config} exited {r.returncode} after {dt:.0f}s\n--- stderr tail ---\n"
                f"{r.stderr[-4000:]}\n--- stdout tail ---\n{r.stdout[-1000:]}")
  return dt


def _jsonl(path) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def _first_turn(transcript: str) -> str:
  """The first human turn of an HH transcript / rendered HH prompt."""
  assert "Human:" in transcript, transcript[:200]
  return transcript.split("Human:", 1)[1].split("\n\nAssistant:", 1)[0].strip()


def _is_png(path) -> bool:
  p = pathlib.Path(path)
  return p.is_file() and p.stat().st_size > 1000 and p.read_bytes()[:8] == PNG


def _trainer_eval(workdir) -> dict:
  """The last eval row of a training run (its final checkpoint, first held-out batch)."""
  rows = [r for r in _jsonl(pathlib.Path(workdir) / "metrics.jsonl") if "eval/accuracy" in r]
  assert rows, f"no eval row in {workdir}/metrics.jsonl"
  return rows[-1]


def _snapshot(root) -> dict:
  """Size and mtime of every file a run wrote (the workdir lock names each run: left out)."""
  return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
          for p in pathlib.Path(root).rglob("*") if p.is_file() and p.name != ".prefjax.lock"}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  assert SHIPPED.is_file(), SHIPPED
  root = tmp_path_factory.mktemp("cli_tasks")
  slice_path = root / "hh_slice.jsonl"
  with gzip.open(SHIPPED, "rt", encoding="utf-8") as f:
    lines = [next(f) for _ in range(SLICE_RECORDS)]
  slice_path.write_text("".join(lines), encoding="utf-8")
  return {"root": root, "slice": slice_path, "times": {}}


def _train(env, name: str, config: str):
  """A STEPS-step training run of `config` on the shipped data; returns its workdir."""
  wd = env["root"] / name
  env["times"][name] = _run(wd, _args(DATA, LENGTHS, MODEL, {
      "total_steps": STEPS, "optim.warmup_steps": 0, "data.batch_size": 8,
      "ckpt.every_steps": STEPS, "log.every_steps": 1, "eval.every_steps": STEPS,
      "eval.num_batches": 1}), config)
  return wd


@pytest.fixture(scope="module")
def rm_run(env):
  return _train(env, "rm", "configs/quickstart.py:rm")


@pytest.fixture(scope="module")
def dpo_run(env):
  return _train(env, "dpo", "configs/quickstart.py")


@pytest.fixture(scope="module")
def eval_rm(env, rm_run):
  wd = env["root"] / "eval_rm"
  sets = f"hh_heldout={SHIPPED}|eval,hh_slice_train={env['slice']}|train|ood"
  env["times"]["eval_reward"] = _run(wd, _args(DATA, LENGTHS, {
      "model.init": rm_run, "eval.sets": sets}), "configs/eval_reward.py")
  return wd


@pytest.fixture(scope="module")
def eval_implicit(env, rm_run, dpo_run):
  wd = env["root"] / "eval_implicit"
  sets = f"hh_heldout={env['slice']}|eval,hh_slice_train={env['slice']}|train|ood"
  env["times"]["eval_implicit_reward"] = _run(wd, _args(DATA, LENGTHS, {
      "model.init": dpo_run, "eval.reward_model": rm_run, "eval.sets": sets}),
      "configs/eval_implicit_reward.py")
  return wd


def _iter_args(rm_run, dpo_run) -> list[str]:
  return _args(DATA, LENGTHS, {
      "model.init": dpo_run, "annotator.kind": "explicit", "annotator.path": rm_run,
      "iterative.num_iterations": 2, "total_steps": ITER_STEPS,
      "iterative.num_prompts": ITER_PROMPTS, "sample.num_samples": K,
      "sample.max_new_tokens": NEW_TOKENS, "sample.batch_size": 16, "data.batch_size": 4,
      "optim.learning_rate": 1e-2, "ckpt.every_steps": ITER_STEPS, "log.every_steps": 1})


@pytest.fixture(scope="module")
def iterative(env, rm_run, dpo_run):
  wd = env["root"] / "iter_explicit"
  env["times"]["iterative_dpo"] = _run(wd, _iter_args(rm_run, dpo_run),
                                       "configs/iterative_dpo.py")
  return wd


@pytest.fixture(scope="module")
def generate(env, rm_run, dpo_run, iterative):
  wd = env["root"] / "generate"
  env["times"]["generate"] = _run(wd, _args(DATA, LENGTHS, {
      "generate.policies": f"dpo={dpo_run},iter_explicit={iterative / 'iter_2'}",
      "generate.reward_model": rm_run, "generate.split": "eval",
      "generate.num_prompts": GEN_PROMPTS, "sample.num_samples": K,
      "sample.max_new_tokens": NEW_TOKENS, "sample.batch_size": 8}), "configs/generate.py")
  return wd


@pytest.fixture(scope="module")
def heldout_turns(eval_rm):
  """First human turns of the held-out 20% of the shipped file (eval_reward's split copy)."""
  recs = _jsonl(eval_rm / "eval_cache" / "hh_heldout.eval.jsonl")
  return {_first_turn(r["chosen"]) for r in recs}


# --------------------------------------------------------------------------- checks


def _check_set_metrics(m: dict, chosen: np.ndarray, rejected: np.ndarray) -> None:
  """The metrics of one set against its per-pair scores (eval_scores.npz)."""
  assert chosen.shape == rejected.shape and chosen.ndim == 1
  n = chosen.size
  assert m["n_pairs"] == n > 0
  assert np.all(np.isfinite(chosen)) and np.all(np.isfinite(rejected))
  keep = chosen != rejected  # eval.ties = exclude
  assert m["n_score_ties"] == int(n - keep.sum())
  assert 0.0 <= m["accuracy"] <= 1.0
  np.testing.assert_allclose(m["accuracy"], np.mean(chosen[keep] > rejected[keep]), atol=1e-12)
  lo, hi = m["accuracy_ci"]
  assert 0.0 <= lo <= m["accuracy"] <= hi <= 1.0 and hi > lo
  both = np.concatenate([chosen, rejected])
  np.testing.assert_allclose(m["mean"], both.mean(), rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(m["std"], both.std(), rtol=1e-6, atol=1e-9)
  assert m["std"] > 0  # a trained model does not give every response one score
  np.testing.assert_allclose(m["margin_mean"], np.mean(chosen - rejected), rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(m["margin_mean"], m["chosen_mean"] - m["rejected_mean"],
                             rtol=1e-6, atol=1e-9)
  assert "length_bias" in m  # response lengths are known for the padded layout


def _scores(workdir, kind: str, name: str) -> tuple[np.ndarray, np.ndarray]:
  with np.load(pathlib.Path(workdir) / "eval_scores.npz") as z:
    return z[f"{kind}__{name}__chosen"], z[f"{kind}__{name}__rejected"]


def _check_against_trainer(trainer_wd, chosen, rejected, *, atol: float) -> None:
  """Scores of the first held-out pairs == the trainer's final eval on its first batch."""
  ev = _trainer_eval(trainer_wd)
  assert ev["step"] == STEPS
  n = int(ev["eval/examples"])
  assert 0 < n <= chosen.size
  c, r = chosen[:n], rejected[:n]
  np.testing.assert_allclose(c.mean(), ev["eval/rewards/chosen"], rtol=1e-3, atol=atol)
  np.testing.assert_allclose(r.mean(), ev["eval/rewards/rejected"], rtol=1e-3, atol=atol)
  np.testing.assert_allclose((c - r).mean(), ev["eval/rewards/margins"], rtol=1e-3, atol=atol)
  np.testing.assert_allclose(np.mean(c > r), ev["eval/accuracy"], atol=1e-6)


def _md_row(name: str, tag: str, m: dict) -> str:
  return f"| {name} | {tag} | {m['n_pairs']} | {m['accuracy']:.3f} |"


def _hh_response(transcript: str) -> str:
  return transcript.rsplit("\n\nAssistant:", 1)[1].strip() if "\n\nAssistant:" in transcript else ""


# --------------------------------------------------------------------------- tests


def test_training_runs_write_checkpoints(rm_run, dpo_run):
  for wd, task in ((rm_run, "reward"), (dpo_run, "preference")):
    cfg = json.loads((wd / "config.json").read_text())
    assert cfg["task"] == task and cfg["model"]["num_layers"] == 1
    assert (wd / "checkpoints" / str(STEPS)).is_dir()
    losses = lh.losses(str(wd))
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert all(math.isfinite(v) for v in losses.values())
  assert json.loads((dpo_run / "config.json").read_text())["reference"]["mode"] == "precomputed"


def test_eval_reward_on_shipped_heldout(eval_rm, rm_run, env):
  res = json.loads((eval_rm / "eval_results.json").read_text())
  assert res["schema"] == "prefjax.eval/1"
  assert res["tags"] == {"hh_heldout": "id", "hh_slice_train": "ood"}
  assert list(res["models"]) == ["explicit"] and "comparison" not in res
  assert res["meta"]["task"] == "eval_reward" and res["meta"]["reward_model"] == str(rm_run)
  sets = res["models"]["explicit"]["sets"]
  assert list(sets) == ["hh_heldout", "hh_slice_train"]
  for name, m in sets.items():
    _check_set_metrics(m, *_scores(eval_rm, "explicit", name))
    # every pair of the split copy was scored (or counted as dropped); data_dropped also
    # counts what the copy itself left out (data_dropped_before_copy)
    copy = eval_rm / "eval_cache" / f"{name}.{'eval' if name == 'hh_heldout' else 'train'}.jsonl"
    before = sum(m.get("data_dropped_before_copy", {}).values())
    assert len(_jsonl(copy)) == m["n_pairs"] + sum(m.get("data_dropped", {}).values()) - before
  # the held-out side is about 20% of the shipped file's 2,354 records
  assert 0.1 * 2354 < sets["hh_heldout"]["n_pairs"] < 0.3 * 2354
  assert 0.6 * SLICE_RECORDS < sets["hh_slice_train"]["n_pairs"] < 0.95 * SLICE_RECORDS
  summ = res["models"]["explicit"]["summary"]
  np.testing.assert_allclose(summ["id_mean"], sets["hh_heldout"]["accuracy"])
  np.testing.assert_allclose(summ["ood_mean"], sets["hh_slice_train"]["accuracy"])
  np.testing.assert_allclose(summ["drop"], summ["id_mean"] - summ["ood_mean"])
  md = (eval_rm / "eval_results.md").read_text()
  assert "## explicit" in md and "**ID − OOD drop**" in md
  for name, tag in res["tags"].items():
    assert _md_row(name, tag, sets[name]) in md, (name, md)
  assert "<table>" in (eval_rm / "eval_results.html").read_text()
  for png in ("accuracy.png", "score_hist_explicit.png", "length_buckets_explicit.png"):
    assert _is_png(eval_rm / png), png


def test_eval_reward_matches_rm_trainer_eval(eval_rm, rm_run):
  """eval_reward loads the RM's final checkpoint with its (non-preset) architecture: its
  scores of the first held-out pairs are the ones the trainer reported at its last eval."""
  _check_against_trainer(rm_run, *_scores(eval_rm, "explicit", "hh_heldout"), atol=1e-5)


def test_hash_split_sides_are_disjoint_and_complete(eval_implicit, heldout_turns, env):
  """The "|eval" / "|train" copies of the slice: no first human turn on both sides, every
  usable record on one side, the eval side inside the shipped file's held-out side."""
  cache = eval_implicit / "eval_cache"
  ev = _jsonl(cache / "hh_heldout.eval.jsonl")
  tr = _jsonl(cache / "hh_slice_train.train.jsonl")
  ev_turns = {_first_turn(r["chosen"]) for r in ev}
  tr_turns = {_first_turn(r["chosen"]) for r in tr}
  assert ev_turns and tr_turns and not ev_turns & tr_turns
  assert ev_turns <= heldout_turns and not tr_turns & heldout_turns
  records = _jsonl(env["slice"])
  unusable = sum(1 for r in records if r["chosen"] == r["rejected"]
                 or not _hh_response(r["chosen"]) or not _hh_response(r["rejected"]))
  assert len(ev) + len(tr) + unusable == len(records)


def test_eval_implicit_reward_side_by_side(eval_implicit, eval_rm, rm_run, dpo_run):
  res = json.loads((eval_implicit / "eval_results.json").read_text())
  assert list(res["models"]) == ["explicit", "implicit"]
  assert res["tags"] == {"hh_heldout": "id", "hh_slice_train": "ood"}
  meta = res["meta"]
  assert meta["task"] == "eval_implicit_reward"
  assert meta["policy"] == str(dpo_run) and meta["reward_model"] == str(rm_run)
  # method and beta from the DPO run; its reference is its own random init (rebuilt)
  assert meta["method"] == "dpo" and meta["beta"] == pytest.approx(0.1)
  assert meta["reference"] == "<random init>"
  for kind, model in res["models"].items():
    assert list(model["sets"]) == ["hh_heldout", "hh_slice_train"]
    for name, m in model["sets"].items():
      _check_set_metrics(m, *_scores(eval_implicit, kind, name))
    s = model["summary"]
    assert s["id_sets"] == ["hh_heldout"] and s["ood_sets"] == ["hh_slice_train"]
    np.testing.assert_allclose(s["id_mean"], model["sets"]["hh_heldout"]["accuracy"])
    np.testing.assert_allclose(s["ood_mean"], model["sets"]["hh_slice_train"]["accuracy"])
    np.testing.assert_allclose(s["drop"], s["id_mean"] - s["ood_mean"])
  ex, im = (res["models"][k]["sets"] for k in ("explicit", "implicit"))
  for name in ex:  # both kinds scored the same pairs
    assert ex[name]["n_pairs"] == im[name]["n_pairs"]
  cmp_ = res["comparison"]
  assert cmp_["kinds"] == ["explicit", "implicit"]
  for name in ex:
    np.testing.assert_allclose(cmp_["accuracy_delta"][name],
                               im[name]["accuracy"] - ex[name]["accuracy"], atol=1e-12)
  summ = {k: res["models"][k]["summary"] for k in res["models"]}
  np.testing.assert_allclose(cmp_["id_mean_delta"],
                             summ["implicit"]["id_mean"] - summ["explicit"]["id_mean"])
  # the explicit side equals eval_reward's scores of the same pairs (same RM, same data keys)
  for name in ex:
    c, r = _scores(eval_implicit, "explicit", name)
    c0, r0 = _scores(eval_rm, "explicit", name)
    np.testing.assert_allclose(c, c0[:c.size], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r, r0[:r.size], rtol=1e-5, atol=1e-6)
  md = (eval_implicit / "eval_results.md").read_text()
  assert "## explicit" in md and "## implicit" in md and "## Comparison" in md
  for kind, sets in (("explicit", ex), ("implicit", im)):
    for name, tag in res["tags"].items():
      assert _md_row(name, tag, sets[name]) in md
  for png in ("accuracy.png", "score_hist_explicit.png", "score_hist_implicit.png",
              "length_buckets_implicit.png"):
    assert _is_png(eval_implicit / png), png


def test_eval_implicit_reward_matches_dpo_trainer_eval(eval_implicit, dpo_run):
  """β·log π/π_ref with the rebuilt random-init reference == the DPO trainer's eval rewards
  (it scored the same first held-out pairs against its precomputed reference)."""
  c, r = _scores(eval_implicit, "implicit", "hh_heldout")
  ev = _trainer_eval(dpo_run)
  # the policy moved away from its reference, so a wrong (or no) reference would show
  assert abs(ev["eval/rewards/chosen"]) + abs(ev["eval/rewards/rejected"]) > 1e-3
  _check_against_trainer(dpo_run, c, r, atol=5e-5)


def test_iterative_dpo_explicit_annotator(iterative, dpo_run, rm_run, heldout_turns):
  rows = _jsonl(iterative / "iterative_metrics.jsonl")
  assert [(r["stage"], r["iteration"]) for r in rows] == [
      ("iteration", 1), ("iteration", 2), ("final", 2)]
  policies = [str(dpo_run), str(iterative / "iter_1"), str(iterative / "iter_2")]
  for i, row in enumerate(rows):
    assert row["policy_index"] == i and row["policy"] == policies[i]
    assert row["num_prompts"] == ITER_PROMPTS and row["num_samples"] == K
    assert 0 < row["response_length"] <= NEW_TOKENS
    assert math.isfinite(row["reward_mean"]) and row["reward_std"] > 0
    assert math.isfinite(row["kl_to_initial"])
  assert rows[0]["kl_to_initial"] == 0.0  # π_0's own samples
  assert rows[1]["kl_to_initial"] != 0.0  # π_1 was trained (lr 1e-2): not π_0 again
  for t in (1, 2):
    row, run = rows[t - 1], iterative / f"iter_{t}"
    samples = _jsonl(run / "samples.jsonl")
    assert len(samples) == ITER_PROMPTS
    scores = np.asarray([s["scores"] for s in samples])
    assert scores.shape == (ITER_PROMPTS, K) and np.all(np.isfinite(scores))
    assert all(len(s["responses"]) == K for s in samples)
    np.testing.assert_allclose(row["reward_mean"], scores.mean(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(row["reward_std"], scores.std(), rtol=1e-6, atol=1e-9)
    # prompts from the train side of the split (never the held-out 20%)
    assert not {_first_turn(s["prompt_text"]) for s in samples} & heldout_turns
    # pairs: best vs worst sample of each kept prompt, under the RM
    pairs = _jsonl(run / "data.jsonl")
    assert row["num_pairs"] == len(pairs) > 0
    assert row["num_pairs"] + row["skipped_ties"] + row["skipped_too_few"] == ITER_PROMPTS
    by_prompt = {json.dumps(s["prompt"]): s for s in samples}
    for p in pairs:
      s = by_prompt[json.dumps(p["prompt"])]
      valid = [k for k, x in enumerate(s["responses"]) if x.strip()]
      score_of = {s["responses"][k]: s["scores"][k] for k in valid}
      assert score_of[p["chosen"]] == max(s["scores"][k] for k in valid)
      assert score_of[p["rejected"]] == min(s["scores"][k] for k in valid)
      assert score_of[p["chosen"]] > score_of[p["rejected"]]
    # the DPO run of iteration t: from π_{t-1}, reference π_0, on those pairs
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["task"] == "preference"
    assert cfg["model"]["init"] == policies[t - 1]
    assert cfg["reference"]["init"] == str(dpo_run)
    assert cfg["data"]["train"] == str(run / "data.jsonl")
    assert cfg["model"]["num_layers"] == 1  # π_0's architecture, not the recipe's
    assert (run / "checkpoints" / str(ITER_STEPS)).is_dir()
    assert row["train/step"] == ITER_STEPS and math.isfinite(row["train/loss"])
  final = _jsonl(iterative / "final" / "samples.jsonl")
  assert len(final) == ITER_PROMPTS
  np.testing.assert_allclose(rows[2]["reward_mean"],
                             np.mean([s["scores"] for s in final]), rtol=1e-6, atol=1e-9)


def test_iterative_dpo_rerun_resumes_without_redoing_work(iterative, rm_run, dpo_run, env):
  before = _snapshot(iterative)
  rows = (iterative / "iterative_metrics.jsonl").read_text()
  dt = _run(iterative, _iter_args(rm_run, dpo_run), "configs/iterative_dpo.py")
  assert _snapshot(iterative) == before  # nothing sampled, trained or rewritten
  assert (iterative / "iterative_metrics.jsonl").read_text() == rows
  assert dt < env["times"]["iterative_dpo"], (dt, env["times"])


def test_generate_two_policies_scored_by_rm(generate, dpo_run, iterative, rm_run,
                                            heldout_turns):
  names = ["dpo", "iter_explicit"]
  recs = {n: _jsonl(generate / "generations" / f"{n}.jsonl") for n in names}
  prompts = None
  for n, rows in recs.items():
    assert len(rows) == GEN_PROMPTS * K
    for r in rows:
      assert isinstance(r["prompt"], str) and r["prompt"].rstrip().endswith("Assistant:")
      assert isinstance(r["response"], str)
      assert isinstance(r["score"], float) and math.isfinite(r["score"])
      assert 0 <= r["length"] <= NEW_TOKENS
    ps = list(dict.fromkeys(r["prompt"] for r in rows))
    assert len(ps) == GEN_PROMPTS
    assert [r["sample"] for r in rows] == list(range(K)) * GEN_PROMPTS  # prompt-major
    prompts = prompts or ps
    assert ps == prompts  # every policy answers the same prompts
  assert {_first_turn(p) for p in prompts} <= heldout_turns  # generate.split=eval
  all_scores = np.asarray([r["score"] for rows in recs.values() for r in rows])
  assert all_scores.std() > 0

  summary = json.loads((generate / "generate_summary.json").read_text())
  assert summary["policies"] == {"dpo": str(dpo_run), "iter_explicit": str(iterative / "iter_2")}
  assert summary["reward_model"] == str(rm_run)
  ev = json.loads((generate / "generation_eval.json").read_text())
  for n, rows in recs.items():
    s = np.asarray([r["score"] for r in rows])
    assert summary["summary"][n]["n"] == ev["policies"][n]["n"] == len(rows)
    np.testing.assert_allclose(summary["summary"][n]["mean_score"], s.mean(), rtol=1e-9)
    np.testing.assert_allclose(summary["summary"][n]["mean_length"],
                               np.mean([r["length"] for r in rows]))
    np.testing.assert_allclose(ev["policies"][n]["mean"], s.mean(), rtol=1e-9)
    np.testing.assert_allclose(ev["policies"][n]["std"], s.std(), rtol=1e-9, atol=1e-12)
  # win rate of the iterative policy over the DPO policy: per-prompt mean scores, ties 0.5
  per = {n: np.asarray([np.mean([r["score"] for r in rows if r["prompt"] == p])
                        for p in prompts]) for n, rows in recs.items()}
  a, b = per["dpo"], per["iter_explicit"]
  win = np.mean(np.where(b > a, 1.0, np.where(b < a, 0.0, 0.5)))
  np.testing.assert_allclose(ev["win_rate"]["iter_explicit_vs_dpo"], win, atol=1e-12)
  np.testing.assert_allclose(ev["win_rate"]["dpo_vs_iter_explicit"], 1 - win, atol=1e-12)

  # newline="": a sampled response may hold a bare "\r" (the table cell keeps it)
  with open(generate / "generation_eval.md", encoding="utf-8", newline="") as f:
    md = f.read()
  for n in names:
    assert f"| {n} | {GEN_PROMPTS * K} | {ev['policies'][n]['mean']:.3f} |" in md
  assert f"Largest score differences: iter_explicit vs dpo (top {GEN_PROMPTS})" in md
  case_rows = [line for line in md.split("\n") if line.startswith("| ") and
               line.split("|")[1].strip().isdigit()]
  assert len(case_rows) == GEN_PROMPTS
  deltas = [float(line.rstrip(" |").rsplit("|", 1)[1]) for line in case_rows]
  assert deltas == sorted(deltas, key=abs, reverse=True)  # largest |Δ| first
  assert _is_png(generate / "generation_eval_scores.png")

