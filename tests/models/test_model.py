"""prefjax.models: names, shapes, masks, sharded init, scan/remat equivalence, reward heads.

Every forward runs at the same shape [2, 16] (shorter sequences are right-padded with
segment 0) so each config compiles once.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from prefjax import models, sharding
from prefjax.models import api

T = 16
# Tiny models: LLVM optimisation only slows compilation down here.
O0 = {"xla_backend_optimization_level": 0}
fwd = jax.jit(models.forward, static_argnums=0, compiler_options=O0)
fwd_hidden = jax.jit(models.forward_hidden, static_argnums=0, compiler_options=O0)
SMALL_G3 = dict(num_layers=3, attention_pattern=("local", "global"))


@functools.lru_cache(maxsize=None)
def _params(name: str, **overrides):
  cfg = models.get_config(name, **overrides)
  return cfg, models.init_params(cfg, 0)


def _row(*seqs, branches=None):
  """Right-padded [1, T] tokens, segments (i+1 per sequence, 0 padding) and positions."""
  toks, segs, pos = np.zeros(T, np.int32), np.zeros(T, np.int32), np.zeros(T, np.int32)
  i = 0
  for s, seq in enumerate(seqs):
    toks[i:i + len(seq)] = seq
    segs[i:i + len(seq)] = 1 if branches else s + 1
    pos[i:i + len(seq)] = np.arange(len(seq))
    i += len(seq)
  return toks[None], segs[None], pos[None]


def _seq(n, seed):
  return np.random.default_rng(seed).integers(1, 256, size=n).astype(np.int32)


def _logits(cfg, params, toks, segs, pos, branch=None):
  return np.asarray(fwd(cfg, params, jnp.asarray(toks), segment_ids=jnp.asarray(segs),
                        positions=jnp.asarray(pos), branch_ids=branch))


def _names(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_names(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = tuple(v.shape)
  return out


def test_gemma_param_names_and_shapes():
  names = _names(models.abstract_params(models.get_config("tiny_gemma")))
  # Official Flax Gemma 2B layout (MQA): q_einsum [N,D,H], kv_einsum [2,K,D,H].
  assert names["embedder/input_embedding"] == (256, 32)
  assert names["layer_0/attn/q_einsum/w"] == (4, 32, 8)
  assert names["layer_0/attn/kv_einsum/w"] == (2, 1, 32, 8)
  assert names["layer_0/attn/attn_vec_einsum/w"] == (4, 8, 32)
  assert names["layer_1/mlp/gating_einsum"] == (2, 32, 64)
  assert names["layer_1/mlp/linear"] == (64, 32)
  assert names["layer_0/pre_attention_norm/scale"] == (32,)
  assert names["layer_0/pre_ffw_norm/scale"] == (32,)
  assert names["final_norm/scale"] == (32,)
  assert len(names) == 2 + 2 * 7


def test_family_specific_names():
  mha = _names(models.abstract_params(models.get_config("tiny_gemma_mha")))
  assert mha["layer_0/attn/qkv_einsum/w"] == (3, 4, 32, 8)
  g3 = _names(models.abstract_params(models.get_config("tiny_gemma3")))
  assert g3["layer_0/attn/_query_norm/scale"] == (8,)
  assert g3["layer_5/attn/_key_norm/scale"] == (8,)
  assert g3["layer_0/mlp/gating_einsum"] == (2, 64, 32)  # transposed (Gemma 3)
  assert g3["layer_0/post_attention_norm/scale"] == g3["layer_0/post_ffw_norm/scale"] == (32,)
  llama = _names(models.abstract_params(models.get_config("tiny_llama")))
  assert llama["lm_head/w"] == (256, 32)
  rm = _names(models.abstract_params(models.get_config("tiny_llama", num_reward_heads=2)))
  assert rm["reward_head/w"] == (32, 2) and rm["reward_head/b"] == (2,) and "lm_head/w" not in rm


def test_gemma_7b_parameter_count():
  n = models.count_params(models.abstract_params(models.get_config("gemma_7b")))
  assert round(n / 1e9, 2) == 8.54
  n2b = models.count_params(models.abstract_params(models.get_config("gemma_2b")))
  assert round(n2b / 1e9, 2) == 2.51


def test_packed_row_equals_separate_forwards():
  cfg, params = _params("tiny_gemma2")  # sliding window 4 + soft-caps
  a, b = _seq(5, 1), _seq(9, 2)
  packed = _logits(cfg, params, *_row(a, b))
  only_a = _logits(cfg, params, *_row(a))
  only_b = _logits(cfg, params, *_row(b))
  np.testing.assert_allclose(packed[0, :5], only_a[0, :5], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(packed[0, 5:14], only_b[0, :9], rtol=1e-5, atol=1e-5)
  # Default positions restart at each segment.
  toks, segs, pos = _row(a, b)
  np.testing.assert_array_equal(
      np.asarray(models.transformer.positions_from_segments(jnp.asarray(segs)))[:, :14],
      pos[:, :14])


def test_sliding_window_mask():
  idx = jnp.arange(6)
  seg = jnp.ones((1, 6), jnp.int32)
  pos = idx[None]
  m = np.asarray(models.attention_mask(idx, idx, seg, seg, q_positions=pos, k_positions=pos,
                                       window=3))[0]
  expected = np.array([[0 <= q - k < 3 for k in range(6)] for q in range(6)])
  np.testing.assert_array_equal(m, expected)
  # All-local model (Mistral style, window 4, 2 layers): receptive field 2 * 3 = 6 tokens.
  cfg, params = _params("tiny_mistral")
  seq = _seq(T, 3)
  seq2 = seq.copy()
  seq2[0] = (seq[0] % 255) + 1
  l1 = _logits(cfg, params, *_row(seq))
  l2 = _logits(cfg, params, *_row(seq2))
  assert np.abs(l1[0, 6] - l2[0, 6]).max() > 1e-4
  np.testing.assert_array_equal(l1[0, 7:], l2[0, 7:])


def test_prompt_sharing_branches_equal_separate_forwards():
  cfg, params = _params("tiny_gemma3", **SMALL_G3)  # local (window 4) + global layers
  prompt, chosen, rejected = _seq(4, 4), _seq(3, 5), _seq(5, 6)
  toks, segs, _ = _row(prompt, chosen, rejected, branches=True)
  br = np.zeros((1, T), np.int32)
  br[0, 4:7], br[0, 7:12] = 1, 2
  pos = np.zeros((1, T), np.int32)
  pos[0, :7] = np.arange(7)
  pos[0, 7:12] = np.arange(4, 9)
  shared = _logits(cfg, params, toks, segs, pos, jnp.asarray(br))
  pc = _logits(cfg, params, *_row(np.concatenate([prompt, chosen])))
  pr = _logits(cfg, params, *_row(np.concatenate([prompt, rejected])))
  np.testing.assert_allclose(shared[0, :7], pc[0, :7], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(shared[0, 7:12], pr[0, 4:9], rtol=1e-5, atol=1e-5)
  # Default positions with branches: prompt, then each branch continues from the prompt.
  _, default_pos = api._inputs(jnp.asarray(toks), jnp.asarray(segs), None, jnp.asarray(br))
  np.testing.assert_array_equal(np.asarray(default_pos)[0, :12], pos[0, :12])


def test_hidden_plus_unembedding_equals_forward():
  cfg, params = _params("tiny_gemma2")
  toks, segs, pos = _row(_seq(T, 7))
  hidden = fwd_hidden(cfg, params, jnp.asarray(toks), segment_ids=jnp.asarray(segs),
                      positions=jnp.asarray(pos))
  assert hidden.shape == (1, T, cfg.embed_dim)
  w = models.unembedding(cfg, params)
  assert w.shape == (cfg.vocab_size, cfg.embed_dim)
  logits = jnp.einsum("btd,vd->btv", hidden, w)
  logits = jnp.tanh(logits / cfg.final_logit_softcap) * cfg.final_logit_softcap
  np.testing.assert_allclose(np.asarray(logits), _logits(cfg, params, toks, segs, pos),
                             rtol=1e-5, atol=1e-5)


def test_sharded_init_matches_single_device():
  cfg = models.get_config("tiny_gemma")
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  sharded = models.init_params(cfg, 0, mesh=mesh)
  emb = sharded["embedder"]["input_embedding"]
  assert emb.sharding == NamedSharding(mesh, P("tensor", "fsdp"))
  assert sharded["layer_0"]["attn"]["q_einsum"]["w"].sharding.spec == P("tensor", "fsdp", None)
  assert sharded["layer_0"]["attn"]["kv_einsum"]["w"].sharding.spec == P(None, None, "fsdp", None)
  assert sharded["layer_0"]["mlp"]["linear"].sharding.spec == P("tensor", "fsdp")
  expected = models.param_shardings(cfg, mesh)
  jax.tree.map(lambda x, s: assert_eq(x.sharding, s), sharded, expected)
  _, single = _params("tiny_gemma")
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               sharded, single)
  # Sharded forward (batch over data x fsdp, logical constraints active) == single device.
  toks, segs, pos = (np.tile(x, (4, 1)) for x in _row(_seq(T, 11)))
  toks[1:, 3] = 7
  ref = _logits(cfg, single, toks, segs, pos)
  batch = [jax.device_put(x, sharding.batch_sharding(mesh, 2)) for x in (toks, segs, pos)]
  with jax.set_mesh(mesh), nn.logical_axis_rules(list(sharding.LOGICAL_AXIS_RULES)):
    out = jax.jit(models.forward, static_argnums=0, compiler_options=O0)(
        cfg, sharded, batch[0], segment_ids=batch[1], positions=batch[2])
  assert out.sharding.spec[0] == ("data", "fsdp")
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)
  # Causal query blocks of 3 slots under the same shardings: equal at every real token.
  blocked = models.Kernels.for_platform("cpu", attention_causal_block=3)
  with jax.set_mesh(mesh), nn.logical_axis_rules(list(sharding.LOGICAL_AXIS_RULES)):
    out = jax.jit(models.forward, static_argnums=0, static_argnames="kernels",
                  compiler_options=O0)(
        cfg, sharded, batch[0], segment_ids=batch[1], positions=batch[2], kernels=blocked)
  real = segs > 0
  np.testing.assert_allclose(np.asarray(out)[real], ref[real], rtol=1e-5, atol=1e-5)


def assert_eq(a, b):
  assert a == b, (a, b)


def test_scan_and_remat_match_unrolled():
  base, params = _params("tiny_gemma3", **SMALL_G3)  # one scanned 2-layer repeat + 1 tail
  scan_cfg = base.replace(scan_layers=True, remat="save_dots")
  stacked = models.stack_layers(scan_cfg, params)
  assert stacked["layers"]["layer_0"]["attn"]["q_einsum"]["w"].shape == (1, 4, 32, 8)
  assert "layer_2" in stacked and "layer_1" not in stacked
  assert (jax.tree.structure(stacked)
          == jax.tree.structure(models.abstract_params(scan_cfg)))
  specs = models.logical_specs(scan_cfg)
  assert specs["layers"]["layer_0"]["attn"]["q_einsum"]["w"] == P("layers", "heads", "embed",
                                                                   "head_dim")
  row = _row(_seq(T, 8))
  ref = _logits(base, params, *row)
  np.testing.assert_allclose(_logits(scan_cfg, stacked, *row), ref, rtol=1e-5, atol=1e-5)
  full = base.replace(remat="full")
  np.testing.assert_allclose(_logits(full, params, *row), ref, rtol=1e-5, atol=1e-5)
  back = models.unstack_layers(scan_cfg, stacked)
  jax.tree.map(np.testing.assert_array_equal, back, params)


def test_reward_model_from_policy():
  cfg, params = _params("tiny_gemma2")
  rcfg, rparams = models.reward_model_from_policy(cfg, params, 3, num_reward_heads=2)
  assert rcfg.num_reward_heads == 2
  assert rparams["reward_head"]["w"].shape == (32, 2)
  np.testing.assert_array_equal(rparams["layer_0"]["mlp"]["linear"],
                                params["layer_0"]["mlp"]["linear"])
  toks, segs, pos = _row(_seq(T, 9))
  hidden = fwd_hidden(rcfg, rparams, jnp.asarray(toks), segment_ids=jnp.asarray(segs),
                      positions=jnp.asarray(pos))
  scores = models.reward_scores(rcfg, rparams, hidden)
  assert scores.shape == (1, T, 2) and scores.dtype == jnp.float32
  expected = np.asarray(hidden) @ np.asarray(rparams["reward_head"]["w"])
  np.testing.assert_allclose(np.asarray(scores), expected, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError):
    models.reward_scores(cfg, params, hidden)


def test_presets_and_config_errors():
  for name in ("gemma_2b", "gemma_7b", "gemma2_2b", "gemma2_9b", "gemma2_27b", "gemma3_1b",
               "gemma3_4b", "gemma3_12b", "gemma3_27b", "llama3_8b", "mistral_7b", "bench_46m"):
    assert models.get_config(name).num_layers > 0
  assert models.get_config("gemma3_4b").layer_types[:6] == ("local",) * 5 + ("global",)
  bench = models.count_params(models.abstract_params(models.get_config("bench_46m")))
  assert 40e6 < bench < 50e6
  with pytest.raises(ValueError, match="unknown model preset"):
    models.get_config("gemma_5b")
  with pytest.raises(ValueError, match="remat"):
    models.get_config("tiny_gemma", remat="some")
