"""`task=export` rebuilds the model from the workdir's record (not the recipe's preset), merges
a LoRA run's adapters, and ships the tokenizer."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.train import loop_helpers as lh


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
  """A LoRA DPO run whose model differs from the recipe's preset (embed_dim 48)."""
  root = tmp_path_factory.mktemp("export")
  data = lh.write_pairs(root / "pairs.jsonl")
  r = lh.run_main(str(root / "run"), lh.overrides(
      data, total_steps=2, **{"model.embed_dim": 48, "model.lora.rank": 2,
                              "model.lora.targets": "q,v,down", "optim.learning_rate": 0.05,
                              "ckpt.every_steps": 2, "eval.every_steps": 0}))
  assert r.returncode == 0, r.stderr[-3000:]
  return root


def test_export_uses_the_recorded_model_merges_lora_and_ships_the_tokenizer(lora_run, tmp_path):
  out = tmp_path / "hf"
  # The recipe's defaults only: no model.embed_dim / model.lora overrides.
  r = lh.run_main(str(tmp_path / "exp"), ["--config.task=export",
                                          f"--config.export.from_workdir={lora_run / 'run'}",
                                          f"--config.export.output_dir={out}"])
  assert r.returncode == 0, r.stderr[-3000:]
  hf = json.loads((out / "config.json").read_text())
  assert hf["hidden_size"] == 48
  assert (out / "tokenizer.model").is_file() and (out / "tokenizer_config.json").is_file()
  adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
  assert adapter["r"] == 2 and sorted(adapter["target_modules"]) == ["down_proj", "q_proj",
                                                                     "v_proj"]
  # The merged weights differ from the frozen base (the adapters trained) ...
  from prefjax import models  # pylint: disable=g-import-not-at-top
  from prefjax.models import lora  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  cfg, merged = models.load_hf_checkpoint(out)
  lcfg, adapters = lora.load_peft_adapters(cfg, merged, out / "adapter")
  b = np.asarray(adapters["layer_0"]["attn"]["q_einsum"]["w"]["q"]["b"])
  assert np.abs(b).max() > 0
  # ... and equal base + adapters: the checkpoint's base, merged here independently.
  from prefjax import checkpoint  # pylint: disable=g-import-not-at-top
  ck = checkpoint.Checkpointer(str(lora_run / "run" / "checkpoints"), async_save=False)
  try:
    abstract = models.abstract_params(cfg)
    ref = ck.restore_subtrees(None, {"ref_params": jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                       sharding=jax.sharding.SingleDeviceSharding(
                                           jax.devices()[0])), abstract)})["ref_params"]
  finally:
    ck.close()
  w = np.asarray(ref["layer_0"]["attn"]["q_einsum"]["w"])
  a = np.asarray(adapters["layer_0"]["attn"]["q_einsum"]["w"]["q"]["a"])
  want = w + lcfg.scale * np.einsum("dr,rnh->ndh", a, b)
  np.testing.assert_allclose(np.asarray(merged["layer_0"]["attn"]["q_einsum"]["w"]), want,
                             atol=1e-5)
  transformers = pytest.importorskip("transformers")
  tok = transformers.AutoTokenizer.from_pretrained(str(out))
  from prefjax import data  # pylint: disable=g-import-not-at-top
  ours = data.load_tokenizer("mistral_v1")
  text = "Human: how do I bake bread?"
  assert tok(text)["input_ids"] == [ours.bos_id] + ours.sp.encode(text)

