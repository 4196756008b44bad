"""Iterative DPO (Lin et al. 2024, Alg. 1): 2 iterations, K=2, 8 prompts, tiny models.

Checks best/worst selection against an independent scoring of every sample with the
annotator, and kill-resume: iteration 1 alone, then a re-run that must not redo it.
"""
import importlib.util
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefjax import models
from prefjax.data import load_tokenizer
from prefjax.train import iterative

REPO = pathlib.Path(__file__).resolve().parents[2]


def _config():
  spec = importlib.util.spec_from_file_location("_cfg_it", REPO / "configs" / "iterative_dpo.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config("runlocal")
  c.data.chat_template = "none"
  c.data.format = "explicit"
  c.data.max_len, c.data.max_prompt_len, c.data.max_response_len = 24, 12, 12
  c.data.batch_size = 8
  c.total_steps = 1
  c.ckpt.every_steps = 1
  c.ckpt.async_save = False
  c.log.progress = False
  c.optim.learning_rate = 1e-3
  c.iterative.prompt_split = ""
  c.sample.num_samples, c.sample.max_new_tokens, c.sample.batch_size = 2, 6, 16
  c.sample.temperature = 1.0
  return c


def test_best_and_worst_rules():
  assert iterative.best_and_worst([0.1, 0.5, -0.2], ["a", "b", "c"]) == ((1, 2), "")
  assert iterative.best_and_worst([0.3, 0.3], ["a", "b"]) == (None, "tie")
  assert iterative.best_and_worst([0.9, 0.1, 0.5], [" ", "b", "c"]) == ((2, 1), "")
  assert iterative.best_and_worst([0.9, 0.1], ["", "b"]) == (None, "too_few")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  root = tmp_path_factory.mktemp("iter")
  cfg = models.get_config("tiny_gemma", vocab_size=32_000)
  pol = models.init_params(cfg, jax.random.PRNGKey(0))
  rcfg, rm = models.reward_model_from_policy(cfg, pol, jax.random.PRNGKey(3))
  models.save_hf_checkpoint(cfg, pol, root / "sft")
  models.save_hf_checkpoint(rcfg, rm, root / "rm")
  words = "red green blue cyan black white gold grey".split()
  with open(root / "prompts.jsonl", "w", encoding="utf-8") as f:
    for i in range(8):
      f.write(json.dumps({"prompt": f"say {words[i]} {words[(3 * i) % 8]}", "chosen": "a",
                          "rejected": "b"}) + "\n")
  return {"root": root, "rcfg": rcfg, "rm": rm}


def _rm_scores(env, prompts, responses, length=32):
  tok = load_tokenizer("mistral_v1")
  toks = np.zeros((len(prompts), length), np.int32)
  last = []
  for i, (p, r) in enumerate(zip(prompts, responses)):
    ids = (tok.encode_prompt(p)[:12] + tok.encode_response(r)[:12])
    toks[i, :len(ids)] = ids
    last.append(len(ids) - 1)
  h = jax.jit(lambda p, t: models.forward_hidden(env["rcfg"], p, t))(env["rm"], jnp.asarray(toks))
  s = np.asarray(models.reward_scores(env["rcfg"], env["rm"], h)[..., 0])
  return s[np.arange(len(prompts)), last]


def _jsonl(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def test_two_iterations_resume_and_selection(env, tmp_path):
  c = _config()
  c.model.init = str(env["root"] / "sft")
  c.data.train = str(env["root"] / "prompts.jsonl")
  c.annotator.kind, c.annotator.path = "explicit", str(env["root"] / "rm")
  wd = tmp_path / "run"

  # "Killed" after iteration 1: only iter_1 is done.
  c.iterative.stop_after = 1
  rows = iterative.run_iterative_dpo(c, str(wd))
  assert [r["iteration"] for r in rows] == [1]
  it1 = wd / "iter_1"
  assert (it1 / "data.jsonl").is_file() and (it1 / "checkpoints" / "1").is_dir()
  assert not (wd / "iter_2").exists()

  # Selection: re-score every sample independently; pairs are argmax / argmin, ties skipped.
  samples = _jsonl(it1 / "samples.jsonl")
  assert len(samples) == 8 and all(len(s["responses"]) == 2 for s in samples)
  flat_p = [s["prompt_text"] for s in samples for _ in s["responses"]]
  flat_r = [r for s in samples for r in s["responses"]]
  want = _rm_scores(env, flat_p, flat_r).reshape(8, 2)
  np.testing.assert_allclose([s["scores"] for s in samples], want, rtol=1e-4, atol=1e-5)
  expected = []
  for s, sc in zip(samples, want):
    texts = s["responses"]
    ok = [k for k in range(2) if texts[k].strip()]
    if len(ok) < 2 or sc[0] == sc[1] or texts[0] == texts[1]:
      continue
    b, w = (0, 1) if sc[0] > sc[1] else (1, 0)
    expected.append({"prompt": s["prompt"], "chosen": texts[b], "rejected": texts[w]})
  assert _jsonl(it1 / "data.jsonl") == expected and expected
  assert rows[0]["num_pairs"] == len(expected)
  np.testing.assert_allclose(rows[0]["reward_mean"], want.mean(), rtol=1e-4, atol=1e-6)

  # A half-written file of iteration 2 is ignored; the re-run does not redo iteration 1.
  marks = {p: os.stat(it1 / p).st_mtime_ns for p in ("data.jsonl", "samples.jsonl",
                                                      "checkpoints/1")}
  (wd / "iter_2").mkdir()
  (wd / "iter_2" / "data.jsonl.tmp").write_text('{"prompt": "half')
  c.iterative.stop_after = 0
  rows = iterative.run_iterative_dpo(c, str(wd))
  assert [(r["stage"], r["iteration"]) for r in rows] == [
      ("iteration", 1), ("iteration", 2), ("final", 2)]
  assert {p: os.stat(it1 / p).st_mtime_ns for p in marks} == marks
  assert (wd / "iter_2" / "checkpoints" / "1").is_dir()
  assert not (wd / "iter_2" / "data.jsonl.tmp").exists()
  assert all(set(r) == {"prompt", "chosen", "rejected"} for r in _jsonl(wd / "iter_2" / "data.jsonl"))
  assert rows[1]["policy"] == str(it1) and rows[2]["policy"] == str(wd / "iter_2")
  assert rows[0]["kl_to_initial"] == 0.0
  assert all(np.isfinite(r["kl_to_initial"]) and r["response_length"] > 0 for r in rows)
  assert "train/loss" in rows[0] and "train/loss" in rows[1]

  # Everything complete: a third run changes nothing.
  assert iterative.run_iterative_dpo(c, str(wd)) == rows
