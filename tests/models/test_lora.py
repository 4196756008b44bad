"""LoRA: gradients against the full-parameter gradient through the chain rule, layouts, and
the merged / PEFT exports against transformers."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefjax import models
from prefjax.models import lora


def _nonzero_b(adapters, seed=1):
  """Random B so that every gradient and delta is non-trivial."""
  leaves, tree = jax.tree.flatten_with_path(adapters)
  rng = np.random.default_rng(seed)
  out = [jnp.asarray(rng.normal(0, 0.3, x.shape), x.dtype)
         if jax.tree_util.keystr(p).endswith("['b']") else x for p, x in leaves]
  return jax.tree.unflatten(jax.tree.structure(adapters), out)


def _loss(cfg, params, tokens, proj):
  return jnp.sum(models.forward(cfg, params, tokens) * proj)


# Independent matrix views (written from the layer docstrings, not from lora._view):
# target -> (key path in a layer, index, einsum of A [in.., r], B [r, out..] -> weight slice).
def _ref_views(cfg):
  heads = "dr,rnh->ndh"
  q = (("attn", "qkv_einsum", "w"), 0, heads) if cfg.use_qkv_einsum else (
      ("attn", "q_einsum", "w"), None, heads)
  kv = ("attn", "qkv_einsum", "w") if cfg.use_qkv_einsum else ("attn", "kv_einsum", "w")
  off = 1 if cfg.use_qkv_einsum else 0
  gate = "dr,rf->fd" if cfg.transpose_gating_einsum else "dr,rf->df"
  return {"q": q, "k": (kv, off, heads), "v": (kv, off + 1, heads),
          "o": (("attn", "attn_vec_einsum", "w"), None, "nhr,rd->nhd"),
          "gate": (("mlp", "gating_einsum"), 0, gate), "up": (("mlp", "gating_einsum"), 1, gate),
          "down": (("mlp", "linear"), None, "fr,rd->fd")}


@pytest.mark.parametrize("preset", ["tiny_gemma", "tiny_gemma_mha", "tiny_gemma3", "tiny_llama"])
def test_adapter_gradients_are_the_chain_rule_of_the_full_gradient(preset):
  """dL/dA and dL/dB of LoRA equal s * G B^T and s * A^T G, with G = dL/dW the full-parameter
  gradient at the merged weights (so an SGD step on the adapters is the full step restricted
  to them)."""
  cfg = models.get_config(preset)
  params = models.init_params(cfg, 0)
  lcfg = lora.LoraConfig(rank=3, alpha=6.0, targets=lora.TARGETS)
  adapters = _nonzero_b(lora.init_adapters(cfg, params, lcfg, jax.random.key(2)))
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 7))
  proj = jnp.asarray(np.random.default_rng(1).normal(size=(2, 7, cfg.vocab_size)), jnp.float32)

  # The reference merge and gradient, from the einsums above.
  views = _ref_views(cfg)
  merged = jax.tree.map(lambda x: x, params)
  for i in range(cfg.num_layers):
    for t, (key, idx, eq) in views.items():
      ad = adapters[f"layer_{i}"]
      for k in key:
        ad = ad[k]
      d = lcfg.scale * jnp.einsum(eq, ad[t]["a"], ad[t]["b"], precision="highest")
      node = merged[f"layer_{i}"]
      for k in key[:-1]:
        node = node[k]
      node[key[-1]] = node[key[-1]] + d if idx is None else node[key[-1]].at[idx].add(d)
  full_grad = jax.jit(jax.grad(lambda p: _loss(cfg, p, tokens, proj)))(merged)

  ours = jax.jit(jax.grad(
      lambda a: _loss(cfg, lora.merge(params, a, lcfg, cfg), tokens, proj)))(adapters)
  for i in range(cfg.num_layers):
    for t, (key, idx, eq) in views.items():
      g = full_grad[f"layer_{i}"]
      ad = adapters[f"layer_{i}"]
      ga = ours[f"layer_{i}"]
      for k in key:
        g, ad, ga = g[k], ad[k], ga[k]
      g = g if idx is None else g[idx]
      ins, outs = eq.split("->")[0].split(",")
      out = eq.split("->")[1]
      ref_da = lcfg.scale * jnp.einsum(f"{out},{outs}->{ins}", g, ad[t]["b"], precision="highest")
      ref_db = lcfg.scale * jnp.einsum(f"{ins},{out}->{outs}", ad[t]["a"], g, precision="highest")
      for got, want, name in ((ga[t]["a"], ref_da, "A"), (ga[t]["b"], ref_db, "B")):
        scale = float(jnp.max(jnp.abs(want)))
        assert scale > 0, (i, t, name)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale,
                                   err_msg=f"layer {i} {t} {name}")


def test_zero_b_is_the_base_model_and_scanned_equals_unscanned():
  cfg = models.get_config("tiny_gemma3")
  params = models.init_params(cfg, 0)
  lcfg = lora.LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "o", "down"))
  adapters = lora.init_adapters(cfg, params, lcfg, jax.random.key(0))
  tokens = np.arange(1, 9)[None]
  np.testing.assert_array_equal(models.forward(cfg, lora.merge(params, adapters, lcfg, cfg), tokens),
                                models.forward(cfg, params, tokens))
  adapters = _nonzero_b(adapters)
  want = models.forward(cfg, lora.merge(params, adapters, lcfg, cfg), tokens)
  scfg = cfg.replace(scan_layers=True)
  sparams = models.stack_layers(scfg, params)
  sadapters = models.stack_layers(scfg, adapters)
  got = models.forward(scfg, lora.merge(sparams, sadapters, lcfg, scfg), tokens)
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert lora.count(adapters) < models.count_params(params) / 5


def test_bad_config_is_refused():
  with pytest.raises(ValueError, match="unknown LoRA targets"):
    lora.LoraConfig(targets=("q", "qq"))
  with pytest.raises(ValueError, match="rank must be > 0"):
    lora.LoraConfig(rank=0)


@pytest.mark.parity
@pytest.mark.parametrize("family", ["gemma3", "llama"])
def test_merged_export_and_peft_adapters_match_transformers(tmp_path, family):
  pytest.importorskip("transformers")
  from tests.models import hf_util  # pylint: disable=g-import-not-at-top
  hf = hf_util.build_hf_model(family)
  hf.save_pretrained(tmp_path / "base", safe_serialization=True)
  cfg, params = models.load_hf_checkpoint(tmp_path / "base")
  lcfg = lora.LoraConfig(rank=4, alpha=8.0, targets=lora.TARGETS)
  adapters = _nonzero_b(lora.init_adapters(cfg, params, lcfg, jax.random.key(0)))
  merged = lora.merge(params, adapters, lcfg, cfg)
  tokens = np.random.default_rng(0).integers(3, cfg.vocab_size, (2, 9))
  ours = np.asarray(models.forward(cfg, merged, tokens))

  models.save_hf_checkpoint(cfg, merged, tmp_path / "merged")
  import transformers  # pylint: disable=g-import-not-at-top
  exported = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / "merged", attn_implementation="eager").eval()
  assert hf_util.max_rel_diff(hf_util.hf_logits(exported, tokens), ours) < 1e-4

  lora.save_peft_adapters(cfg, adapters, lcfg, tmp_path / "adapter")
  lcfg2, adapters2 = lora.load_peft_adapters(cfg, params, tmp_path / "adapter")
  assert lcfg2 == lcfg
  jax.tree.map(np.testing.assert_array_equal, adapters2, adapters)
  peft = pytest.importorskip("peft", reason="peft not installed: PEFT load not checked")
  with_adapter = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
  assert hf_util.max_rel_diff(hf_util.hf_logits(with_adapter, tokens), ours) < 1e-4
