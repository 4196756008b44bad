"""eval_reward / eval_implicit_reward / generate tasks on tiny models saved as HF dirs.

The numbers in eval_results.json must equal an independent scoring of the same pairs
(tokenized here by hand, scored with a plain forward pass).
"""
import importlib.util
import json
import pathlib

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from prefjax import models
from prefjax.data import load_tokenizer
from prefjax.eval import generate as gen
from prefjax.eval import tasks

REPO = pathlib.Path(__file__).resolve().parents[2]
WORDS = "red green blue cyan black white gold grey pink teal".split()
BETA = 0.1


def _config(name, arg="runlocal"):
  spec = importlib.util.spec_from_file_location(f"_cfg_{name}", REPO / "configs" / f"{name}.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config(arg)
  c.data.chat_template = "none"
  c.data.max_len, c.data.max_prompt_len, c.data.max_response_len = 32, 16, 16
  c.data.batch_size = 4
  c.log.progress = False
  c.eval.bootstrap = 0
  return c


def _records(n, seed):
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    w = [WORDS[j] for j in rng.integers(0, len(WORDS), 5)]
    out.append({"prompt": f"q{i} {w[0]} {w[1]}", "chosen": f"{w[2]} {w[3]}",
                "rejected": f"{w[4]} {w[0]} {w[1]}"})
  return out


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  root = tmp_path_factory.mktemp("tasks")
  cfg = models.get_config("tiny_gemma", vocab_size=32_000)
  pol = models.init_params(cfg, jax.random.PRNGKey(0))
  ref = models.init_params(cfg, jax.random.PRNGKey(1))
  rcfg, rm = models.reward_model_from_policy(cfg, ref, jax.random.PRNGKey(2))
  for name, c, p in (("policy", cfg, pol), ("ref", cfg, ref), ("rm", rcfg, rm)):
    models.save_hf_checkpoint(c, p, root / name)
  sets = {"local_id": _records(6, 0), "local_ood": _records(5, 1)}
  sets["local_id"].append({"prompt": "same", "chosen": "x y", "rejected": "x y"})  # dropped
  for name, recs in sets.items():
    with open(root / f"{name}.jsonl", "w", encoding="utf-8") as f:
      f.writelines(json.dumps(r) + "\n" for r in recs)
  return {"root": root, "cfg": cfg, "pol": pol, "ref": ref, "rcfg": rcfg, "rm": rm,
          "sets": {k: [r for r in v if r["chosen"] != r["rejected"]] for k, v in sets.items()}}


def _eval_sets(env):
  root = env["root"]
  return {"local_id": str(root / "local_id.jsonl"),
          "local_ood": {"path": str(root / "local_ood.jsonl"), "tag": "ood"}}


def _padded(tok, pairs, length=40):
  """Right-padded [N, length] tokens of (prompt, response) texts, and the lengths."""
  toks = np.zeros((len(pairs), length), np.int32)
  lens, plens = [], []
  for i, (prompt, response) in enumerate(pairs):
    p, r = tok.encode_prompt(prompt), tok.encode_response(response)
    toks[i, :len(p) + len(r)] = p + r
    lens.append(len(p) + len(r))
    plens.append(len(p))
  return jnp.asarray(toks), np.asarray(lens), np.asarray(plens)


def rm_scores(env, tok, pairs):
  """Reward head at the last real token (causal: right padding does not matter)."""
  toks, lens, _ = _padded(tok, pairs)
  h = jax.jit(lambda p, t: models.forward_hidden(env["rcfg"], p, t))(env["rm"], toks)
  s = np.asarray(models.reward_scores(env["rcfg"], env["rm"], h)[..., 0])
  return s[np.arange(len(pairs)), lens - 1]


def logps(cfg, params, tok, pairs):
  """Summed response log-probs from full logits (log_softmax), one jitted call."""
  toks, lens, plens = _padded(tok, pairs)
  logits = jax.jit(lambda p, t: models.forward(cfg, p, t))(params, toks)
  lp = np.asarray(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1], -1),
                                      toks[:, 1:, None], -1)[..., 0])
  return np.asarray([lp[i, plens[i] - 1:lens[i] - 1].sum() for i in range(len(pairs))])


def _check_set(m, chosen, rejected):
  chosen, rejected = np.asarray(chosen), np.asarray(rejected)
  keep = chosen != rejected  # ties excluded
  assert m["n_pairs"] == len(chosen)
  np.testing.assert_allclose(m["accuracy"], np.mean(chosen[keep] > rejected[keep]), atol=1e-9)
  np.testing.assert_allclose(m["chosen_mean"], chosen.mean(), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(m["rejected_mean"], rejected.mean(), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(m["margin_mean"], (chosen - rejected).mean(), rtol=1e-4, atol=1e-5)


def test_parse_sets_groups_and_local_entries():
  s = tasks.parse_sets("id,pandalm,mine=/x/y.jsonl,held=/x/z.jsonl|eval|ood")
  assert list(s)[:4] == ["hh_harmless_base", "hh_helpful_base", "hh_helpful_online",
                         "hh_helpful_rejection_sampled"]
  assert s["pandalm"] is None and s["mine"] == {"path": "/x/y.jsonl", "format": "auto",
                                                 "tag": "id", "split": None}
  assert s["held"] == {"path": "/x/z.jsonl", "format": "auto", "tag": "ood", "split": "eval"}
  with pytest.raises(ValueError, match="unknown eval set"):
    tasks.parse_sets("nope")


def test_eval_reward_matches_independent_scoring(env, tmp_path):
  c = _config("eval_reward")
  c.model.init = str(env["root"] / "rm")
  c.eval.sets = _eval_sets(env)
  tasks.run_eval_reward(c, str(tmp_path))
  res = json.loads((tmp_path / "eval_results.json").read_text())
  assert set(res["models"]) == {"explicit"}
  assert res["tags"] == {"local_id": "id", "local_ood": "ood"}
  tok = load_tokenizer("mistral_v1")
  accs = {}
  for name, recs in env["sets"].items():
    m = res["models"]["explicit"]["sets"][name]
    ch = rm_scores(env, tok, [(r["prompt"], r["chosen"]) for r in recs])
    rj = rm_scores(env, tok, [(r["prompt"], r["rejected"]) for r in recs])
    _check_set(m, ch, rj)
    accs[name] = m["accuracy"]
  assert res["models"]["explicit"]["sets"]["local_id"]["data_dropped"] == {"identical": 1}
  summ = res["models"]["explicit"]["summary"]
  np.testing.assert_allclose(summ["drop"], accs["local_id"] - accs["local_ood"])
  assert (tmp_path / "eval_results.md").is_file() and list(tmp_path.glob("*.png"))


def test_eval_reward_num_batches_caps_each_set(env, tmp_path):
  """`eval.num_batches=1` with 4-pair batches scores exactly the first 4 pairs of each set."""
  c = _config("eval_reward")
  c.model.init = str(env["root"] / "rm")
  c.eval.sets = _eval_sets(env)
  c.eval.num_batches = 1
  c.eval.plots = False
  tasks.run_eval_reward(c, str(tmp_path))
  res = json.loads((tmp_path / "eval_results.json").read_text())
  assert res["meta"]["num_batches"] == 1
  tok = load_tokenizer("mistral_v1")
  for name, recs in env["sets"].items():
    m = res["models"]["explicit"]["sets"][name]
    assert m["num_batches_cap"] == 1
    first = recs[:4]  # local_id's identical pair is the 7th record: not in the first batch
    ch = rm_scores(env, tok, [(r["prompt"], r["chosen"]) for r in first])
    rj = rm_scores(env, tok, [(r["prompt"], r["rejected"]) for r in first])
    _check_set(m, ch, rj)


def test_split_eval_set_reports_what_the_copy_left_out(env, tmp_path):
  """A `path|eval` set is scored from a copy of its held-out side; the records the copy left
  out (a line that is not JSON; identical pairs on that side) still appear in data_dropped."""
  from prefjax.data import formats
  from prefjax.data import index as index_lib
  recs = _records(24, 7)
  recs += [{"prompt": f"tie {i} {WORDS[i]}", "chosen": "same words", "rejected": "same words"}
           for i in range(8)]
  path = tmp_path / "split_me.jsonl"
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r) + "\n" for r in recs)
    f.write("{not json\n")
  held = [r for r in recs if index_lib.in_split(formats.parse(r, "auto"), "eval", 0.5)]
  c = _config("eval_reward")
  c.model.init = str(env["root"] / "rm")
  c.data.split_fraction = 0.5
  c.eval.sets = {"held": {"path": str(path), "split": "eval"}}
  c.eval.plots = False
  tasks.run_eval_reward(c, str(tmp_path / "out"))
  m = json.loads((tmp_path / "out" / "eval_results.json").read_text()
                 )["models"]["explicit"]["sets"]["held"]
  identical = sum(r["chosen"] == r["rejected"] for r in held)
  assert 0 < identical < 8  # the ties fall on both sides of the split
  assert m["n_pairs"] == len(held) - identical
  assert m["data_dropped"].get("identical", 0) == identical
  assert sum(m["data_dropped"].values()) == identical + 1  # + the line that is not JSON
  assert m["data_dropped_before_copy"] == m["data_dropped"]  # the copy holds only valid pairs


def test_eval_implicit_reward_side_by_side(env, tmp_path):
  c = _config("eval_implicit_reward")
  c.model.init = str(env["root"] / "policy")
  c.reference.init = str(env["root"] / "ref")
  c.eval.reward_model = str(env["root"] / "rm")
  c.eval.method, c.eval.beta = "dpo", BETA
  c.eval.sets = _eval_sets(env)
  c.eval.plots = False
  tasks.run_eval_implicit_reward(c, str(tmp_path))
  res = json.loads((tmp_path / "eval_results.json").read_text())
  assert list(res["models"]) == ["explicit", "implicit"]
  assert res["comparison"]["kinds"] == ["explicit", "implicit"]
  tok = load_tokenizer("mistral_v1")
  cfg = env["cfg"]
  for name, recs in env["sets"].items():
    r_c, r_r = [BETA * (logps(cfg, env["pol"], tok, pairs) - logps(cfg, env["ref"], tok, pairs))
                for pairs in ([(r["prompt"], r["chosen"]) for r in recs],
                              [(r["prompt"], r["rejected"]) for r in recs])]
    _check_set(res["models"]["implicit"]["sets"][name], r_c, r_r)
    imp = res["models"]["implicit"]["sets"][name]["accuracy"]
    exp = res["models"]["explicit"]["sets"][name]["accuracy"]
    np.testing.assert_allclose(res["comparison"]["accuracy_delta"][name], imp - exp)
  assert res["meta"]["method"] == "dpo" and res["meta"]["beta"] == BETA


def test_generate_writes_scored_jsonl_and_report(env, tmp_path):
  c = _config("generate")
  c.data.train = str(env["root"] / "local_ood.jsonl")
  c.generate.split = ""
  c.generate.num_prompts = 3
  c.generate.policies = f"a={env['root'] / 'policy'},b={env['root'] / 'ref'}"
  c.generate.reward_model = str(env["root"] / "rm")
  c.sample.num_samples, c.sample.max_new_tokens, c.sample.batch_size = 2, 4, 8
  out = gen.run_generate(c, str(tmp_path))
  tok = load_tokenizer("mistral_v1")
  for name in ("a", "b"):
    recs = [json.loads(l) for l in (tmp_path / "generations" / f"{name}.jsonl").open()]
    assert len(recs) == 6 and [r["sample"] for r in recs[:2]] == [0, 1]
    want = rm_scores(env, tok, [(r["prompt"], r["response"]) for r in recs])
    np.testing.assert_allclose([r["score"] for r in recs], want, rtol=1e-4, atol=1e-5)
  assert {"json", "markdown", "plot"} <= set(out["files"])


@pytest.mark.parametrize("name", ["eval_reward", "eval_implicit_reward", "generate",
                                  "iterative_dpo"])
@pytest.mark.parametrize("arg", [None, "runlocal"])
def test_recipes_build_and_validate(name, arg):
  from prefjax.train import iterative, validation  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(f"_cfg_{name}", REPO / "configs" / f"{name}.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config(arg)
  assert c.task == name
  validation.validate(c)
  if name == "iterative_dpo":  # the per-iteration DPO run must be a valid preference config
    validation.validate(iterative.train_config(c, "x.jsonl", "/sft", "/sft"))
  assert f"--config=configs/{name}.py" in mod.__doc__
