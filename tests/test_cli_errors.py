"""User errors found at startup: each is one `error:` line (exit status 2), never a traceback.

Tokenizer and eval-set paths, `model.init` / `reference.init` paths, typos in the enumerated
`data.*` keys, and a `mesh.tensor` that does not divide the attention heads.
"""
import json
import os

import ml_collections
import pytest

from prefjax.data import config as data_config
from prefjax.train import validation
from tests.train import loop_helpers as lh


# ----------------------------------------------------------------- validation-level


@pytest.mark.parametrize("key,value,allowed", [
    ("format", "explict", "explicit"),
    ("kind", "pair", "rankings"),
    ("layout", "packd", "prompt_shared"),
    ("on_bad_record", "skipp", "skip"),
    ("chat_template", "chatml", "llama3"),
])
def test_enumerated_data_key_lists_allowed_values(key, value, allowed):
  data = data_config.default_data_config()
  data[key] = value
  with pytest.raises(validation.ConfigError) as e:
    validation.validate_data_keys(data)
  msg = str(e.value)
  assert f"config.data.{key}={value!r}" in msg and allowed in msg and "\n" not in msg


def test_default_data_keys_are_valid():
  validation.validate_data_keys(data_config.default_data_config())


def test_init_path_is_classified(tmp_path):
  (tmp_path / "empty").mkdir()
  (tmp_path / "junk.bin").write_text("x")
  (tmp_path / "wd" / "checkpoints").mkdir(parents=True)
  (tmp_path / "odd").mkdir()
  (tmp_path / "odd" / "notes.txt").write_text("x")
  cases = {"missing": "does not exist", "empty": "is an empty directory",
           "junk.bin": "is a file", "wd": "prefjax workdir without any checkpoint step",
           "odd": "no checkpoint in it (holds notes.txt)"}
  for name, needle in cases.items():
    with pytest.raises(validation.ConfigError) as e:
      validation.check_init_path("model.init", str(tmp_path / name))
    assert needle in str(e.value) and "expected a prefjax workdir" in str(e.value)
  (tmp_path / "wd" / "checkpoints" / "4").mkdir()
  validation.check_init_path("model.init", str(tmp_path / "wd"))
  (tmp_path / "hf").mkdir()
  (tmp_path / "hf" / "config.json").write_text("{}")
  validation.check_init_path("reference.init", str(tmp_path / "hf"))
  validation.check_init_path("model.init", None)
  validation.check_init_path("model.init", "gs://bucket/run")


def test_data_paths(tmp_path):
  config = ml_collections.ConfigDict({"data": data_config.default_data_config().to_dict()})
  validation.check_data_paths(config)  # the shipped tokenizer, no eval set
  config.data.tokenizer = str(tmp_path / "nope.model")
  with pytest.raises(validation.ConfigError, match="config.data.tokenizer=.*no such file"):
    validation.check_data_paths(config)
  config.data.tokenizer = "mistral_v1"
  config.data.eval = {"a": lh.write_pairs(tmp_path / "a.jsonl", n=4),
                      "b": str(tmp_path / "b*.jsonl")}
  with pytest.raises(validation.ConfigError, match=r"config.data.eval.b=.*glob matched nothing"):
    validation.check_data_paths(config)


class _Cfg:
  num_heads, num_kv_heads = 4, 1


def test_mesh_tensor_must_divide_heads():
  rules = (("heads", "tensor"), ("kv_heads", None))
  validation.check_heads(_Cfg, {"data": 1, "fsdp": 2, "tensor": 4}, rules)
  with pytest.raises(validation.ConfigError, match=r"mesh.tensor=8 .*num_heads=4, num_kv_heads=1"):
    validation.check_heads(_Cfg, {"data": 1, "fsdp": 1, "tensor": 8}, rules)
  with pytest.raises(validation.ConfigError, match=r"mesh.tensor=2 .*num_kv_heads=1"):
    validation.check_heads(_Cfg, {"tensor": 2}, (("heads", "tensor"), ("kv_heads", "tensor")))


# ------------------------------------------------------------------------ CLI-level


def _assert_one_line(r, needle):
  assert r.returncode == 2, r.stderr[-3000:]
  assert needle in r.stderr, r.stderr[-3000:]
  assert "Traceback" not in r.stderr, r.stderr[-3000:]


@pytest.mark.parametrize("case", ["tokenizer", "model_init_empty", "reference_init_missing",
                                  "model_init_file", "format", "mesh_tensor"])
def test_startup_error_is_one_line(tmp_path, case):
  data = lh.write_pairs(tmp_path / "pairs.jsonl")
  (tmp_path / "empty").mkdir()
  (tmp_path / "junk.bin").write_text("x")
  extra, needle = {
      "tokenizer": ({"data.tokenizer": "/nope.model"}, "config.data.tokenizer='/nope.model'"),
      "model_init_empty": ({"model.init": str(tmp_path / "empty")}, "is an empty directory"),
      "reference_init_missing": ({"reference.init": str(tmp_path / "nope")},
                                 "config.reference.init="),
      "model_init_file": ({"model.init": str(tmp_path / "junk.bin")}, "is a file"),
      "format": ({"data.format": "explict"}, "config.data.format='explict'; expected one of"),
      "mesh_tensor": ({"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 8},
                      "config.mesh.tensor=8 must divide"),
  }[case]
  r = lh.run_main(str(tmp_path / "wd"), lh.overrides(data, **extra))
  _assert_one_line(r, needle)


def test_bad_eval_set_stops_before_the_first_step(tmp_path):
  data = lh.write_pairs(tmp_path / "pairs.jsonl")
  evals = tmp_path / "eval.jsonl"
  lh.write_pairs(evals, n=8, seed=1)
  with open(evals, "a", encoding="utf-8") as f:
    f.write(json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
  workdir = tmp_path / "wd"
  r = lh.run_main(str(workdir), lh.overrides(
      data, **{"data.eval": str(evals), "data.on_bad_record": "error"}))
  _assert_one_line(r, "eval.jsonl")
  ckpts = workdir / "checkpoints"
  assert not (ckpts.exists() and os.listdir(ckpts)), "trained before opening the eval set"
