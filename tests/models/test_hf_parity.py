"""Parity with Hugging Face transformers: import, export round trip, reward models (float32)."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefjax import models, sharding
from prefjax.models.safetensors_io import CheckpointReader, write_sharded

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from tests.models.hf_util import build_hf_model, hf_logits, max_rel_diff  # noqa: E402

pytestmark = pytest.mark.parity
FAMILIES = ("gemma", "gemma2", "gemma3", "llama", "mistral")
TOKENS = np.random.default_rng(0).integers(3, 128, size=(2, 12)).astype(np.int32)
O0 = {"xla_backend_optimization_level": 0}
fwd = jax.jit(models.forward, static_argnums=0, compiler_options=O0)
fwd_hidden = jax.jit(models.forward_hidden, static_argnums=0, compiler_options=O0)


def _load_hf(path, seq_cls=False):
  cls = (transformers.AutoModelForSequenceClassification if seq_cls
         else transformers.AutoModelForCausalLM)
  return cls.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_logit_parity_and_export_round_trip(family, tmp_path):
  model = build_hf_model(family)
  model.save_pretrained(tmp_path / "hf")
  ref = hf_logits(model, TOKENS)
  cfg, params = models.load_hf_checkpoint(tmp_path / "hf")
  assert cfg.family == family
  ours = np.asarray(fwd(cfg, params, jnp.asarray(TOKENS)))
  assert max_rel_diff(ours, ref) < 1e-4, family
  models.save_hf_checkpoint(cfg, params, tmp_path / "out", max_shard_size=20_000)
  index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1  # really sharded
  assert max_rel_diff(hf_logits(_load_hf(tmp_path / "out"), TOKENS), ref) < 1e-4, family


@pytest.mark.parametrize("family", ("gemma", "llama"))
def test_sequence_classification_reward_round_trip(family, tmp_path):
  model = build_hf_model(family, num_labels=1)
  model.save_pretrained(tmp_path / "hf")
  ref = hf_logits(model, TOKENS)  # [B, 1] at the last (non-pad) token
  cfg, params = models.load_hf_checkpoint(tmp_path / "hf")
  assert cfg.num_reward_heads == 1 and "lm_head" not in params
  hidden = fwd_hidden(cfg, params, jnp.asarray(TOKENS))
  ours = np.asarray(models.reward_scores(cfg, params, hidden))[:, -1]
  assert max_rel_diff(ours, ref) < 1e-4
  models.save_hf_checkpoint(cfg, params, tmp_path / "out")
  assert max_rel_diff(hf_logits(_load_hf(tmp_path / "out", seq_cls=True), TOKENS), ref) < 1e-4


def test_bf16_checkpoint_and_sharded_load(tmp_path):
  model = build_hf_model("gemma2").to(torch.bfloat16)
  model.save_pretrained(tmp_path / "hf")
  cfg, params = models.load_hf_checkpoint(tmp_path / "hf")
  emb = model.get_input_embeddings().weight.detach().float().numpy()
  np.testing.assert_array_equal(np.asarray(params["embedder"]["input_embedding"]), emb)
  assert params["embedder"]["input_embedding"].dtype == jnp.float32
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  _, sharded = models.load_hf_checkpoint(tmp_path / "hf", mesh=mesh)
  expected = models.param_shardings(cfg, mesh)
  jax.tree.map(lambda x, s: np.testing.assert_equal(x.sharding == s, True), sharded, expected)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               sharded, params)
  # scan_layers import stacks the layers.
  scfg, stacked = models.load_hf_checkpoint(tmp_path / "hf", scan_layers=True)
  assert scfg.scan_layers and stacked["layers"]["layer_0"]["mlp"]["linear"].shape[0] == 1
  # Export from the scanned layout, in bfloat16, re-import: the same (bf16-exact) values.
  models.save_hf_checkpoint(scfg, stacked, tmp_path / "scan_out", dtype="bfloat16")
  _, again = models.load_hf_checkpoint(tmp_path / "scan_out")
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               again, params)


def test_clear_errors(tmp_path):
  bad = tmp_path / "gpt2"
  bad.mkdir()
  (bad / "config.json").write_text(json.dumps({"model_type": "gpt2",
                                               "architectures": ["GPT2LMHeadModel"]}))
  with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'"):
    models.load_hf_checkpoint(bad)
  model = build_hf_model("llama")
  model.save_pretrained(tmp_path / "hf")
  reader = CheckpointReader(tmp_path / "hf")
  keep = [(n, reader.get(n)) for n in sorted(reader.files) if "layers.1.mlp.up_proj" not in n]
  (tmp_path / "hf" / "model.safetensors").unlink()
  write_sharded(tmp_path / "hf", keep, max_shard_size="1GB")
  with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*model\.safetensors"):
    models.load_hf_checkpoint(tmp_path / "hf")


@pytest.mark.parametrize("family", ("gemma2", "llama"))
def test_greedy_sampler_matches_transformers_generate(family, tmp_path):
  model = build_hf_model(family)
  model.save_pretrained(tmp_path / "hf")
  cfg, params = models.load_hf_checkpoint(tmp_path / "hf")
  prompts = np.array([[5, 17, 33, 0, 0], [7, 9, 11, 13, 21]], np.int32)  # right-padded
  lengths = np.array([3, 5], np.int32)
  left = np.array([[0, 0, 5, 17, 33], [7, 9, 11, 13, 21]])
  mask = (np.arange(5)[None] >= 5 - lengths[:, None]).astype(np.int64)
  with torch.no_grad():
    ref = model.generate(input_ids=torch.tensor(left), attention_mask=torch.tensor(mask),
                         max_new_tokens=8, do_sample=False, eos_token_id=2, pad_token_id=0)
  ref = ref[:, 5:].numpy()
  ours = models.sample(cfg, params, prompts, lengths, max_new_tokens=8, stop_tokens=[2])
  got = np.asarray(ours.tokens)[:, :ref.shape[1]]
  np.testing.assert_array_equal(got, ref)
