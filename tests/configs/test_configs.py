"""Every recipe builds and validates; a few runlocal variants train 2 steps."""
import importlib.util
import pathlib

import pytest

from tests.train import loop_helpers as lh

# The training recipes (eval / generate / iterative DPO recipes are tested with their tasks).
CONFIGS = ["dpo_gemma2b", "dpo_gemma7b", "kto_gemma2b", "orpo_gemma2b", "quickstart",
           "rm_gemma2b", "rm_gemma7b", "sft_gemma2b", "simpo_gemma2_9b"]


def load(name: str, arg=None):
  path = lh.REPO / "configs" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"_cfg_{name}", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def test_all_recipes_present():
  assert {"quickstart", "rm_gemma2b", "rm_gemma7b", "dpo_gemma2b", "dpo_gemma7b",
          "simpo_gemma2_9b", "kto_gemma2b", "orpo_gemma2b", "sft_gemma2b"} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("arg", [None, "runlocal"])
def test_builds_and_validates(name, arg):
  from prefjax.train import validation  # pylint: disable=g-import-not-at-top
  c = load(name, arg)
  validation.validate(c)
  if arg == "runlocal":
    assert c.total_steps == 2 and c.model.preset.startswith("tiny")


def test_docstrings_give_the_command():
  for name in CONFIGS:
    text = (lh.REPO / "configs" / f"{name}.py").read_text()
    assert f"--config=configs/{name}.py" in text, name


def test_unknown_arg_is_an_error():
  with pytest.raises(ValueError, match="unknown config argument"):
    load("dpo_gemma2b", "runlokal")


@pytest.mark.parametrize("name", ["dpo_gemma2b", "rm_gemma2b"])
def test_runlocal_trains_two_steps(tmp_path, name):
  r = lh.run_main(str(tmp_path / name), ["--config.log.progress=False"],
                  config=f"configs/{name}.py:runlocal")
  assert r.returncode == 0, r.stderr[-3000:]
  assert sorted(lh.losses(str(tmp_path / name))) == [1, 2]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["kto_gemma2b", "orpo_gemma2b", "sft_gemma2b",
                                  "simpo_gemma2_9b", "dpo_gemma7b", "rm_gemma7b",
                                  "quickstart"])
def test_runlocal_trains_two_steps_slow(tmp_path, name):
  test_runlocal_trains_two_steps(tmp_path, name)


TPU_RECIPES = [n for n in CONFIGS if n != "quickstart"]


def _module(name: str):
  path = lh.REPO / "configs" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"_cfg_mod_{name}", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.mark.parametrize("name", TPU_RECIPES)
def test_tpu_recipes_name_their_slice_and_validate_on_it(name):
  """Each TPU recipe names its slice (TPU_TOPOLOGY, the docstring's prefjax.aot command, the
  compile matrix's target row) and validates for that slice's chips and hosts."""
  import sys  # pylint: disable=g-import-not-at-top
  from prefjax.aot import chips  # pylint: disable=g-import-not-at-top
  from prefjax.train import validation  # pylint: disable=g-import-not-at-top
  mod = _module(name)
  topo = chips.parse_topology(mod.TPU_TOPOLOGY)
  assert f"--topology={mod.TPU_TOPOLOGY}" in mod.__doc__
  sys.path.insert(0, str(lh.REPO / "benchmarks"))
  try:
    import tpu_compile  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)
  assert tpu_compile.MATRIX[name][0] == ("target", mod.TPU_TOPOLOGY, [])
  hosts = max(1, topo.chips // 4)  # 4 chips per host, as the compile topologies have
  validation.validate(mod.get_config(), num_devices=topo.chips, num_processes=hosts)
