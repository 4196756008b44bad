"""`Kernels`: per-platform defaults, validation, and that every kernel choice computes the same
model as plain attention (the splash path through a stand-in and, when present, the real one)."""
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefjax import models
from prefjax.models import Kernels
from prefjax.models.config import MOVED_TO_KERNELS, config_from_dict, config_to_dict
from prefjax.models.layers import attend
from prefjax.models.transformer import attention_mask

# The independent reference: every query attends over the whole row under the mask.
PLAIN = Kernels(attention="xla", attention_query_block=0, attention_causal_block=0)


def test_platform_defaults():
  cpu = Kernels.for_platform("cpu")
  assert (cpu.attention, cpu.attention_query_block, cpu.attention_causal_block,
          cpu.attention_key_tile, cpu.cpu_scheduler) == ("xla", 256, 256, 0, "memory_optimized")
  assert cpu.logps_implementation is None
  tpu = Kernels.for_platform("tpu")
  # No CPU kernel is traced on TPU unless asked for.
  assert tpu.attention == "splash"
  assert (tpu.attention_query_block, tpu.attention_causal_block, tpu.attention_key_tile) == (
      0, 0, 0)
  assert tpu.cpu_scheduler == "xla_default"
  gpu = Kernels.for_platform("gpu")
  assert gpu == PLAIN.replace(cpu_scheduler="xla_default") == Kernels()
  assert Kernels.for_platform("cuda") == gpu and Kernels.for_platform("TPU") == tpu
  assert Kernels.for_platform("tpu", attention="xla", attention_key_tile=64) == tpu.replace(
      attention="xla", attention_key_tile=64)
  assert hash(cpu) == hash(Kernels.for_platform("cpu"))  # a static jit argument


@pytest.mark.parametrize("kwargs, match", [
    (dict(attention="flash"), "kernels.attention='flash'; expected one of xla | splash"),
    (dict(attention_key_tile=-1), "kernels.attention_key_tile=-1 must be >= 0"),
    (dict(attention_causal_block=-4), "kernels.attention_causal_block=-4 must be >= 0"),
    (dict(attention_query_block=2.5), "kernels.attention_query_block=2.5 must be an int"),
    (dict(logps_implementation="fused"), "kernels.logps_implementation='fused'"),
    (dict(cpu_scheduler="fast"), "kernels.cpu_scheduler='fast'; expected one of"),
])
def test_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    Kernels.for_platform("cpu", **kwargs)


def test_unknown_platform_and_option():
  with pytest.raises(ValueError, match="unknown platform 'metal'"):
    Kernels.for_platform("metal")
  with pytest.raises(ValueError, match=r"unknown kernel options \['attention_tile'\]"):
    Kernels.for_platform("cpu", attention_tile=64)


def test_model_config_has_no_kernel_fields():
  cfg = models.get_config("tiny_gemma")
  d = config_to_dict(cfg)
  assert not set(MOVED_TO_KERNELS) & set(d)
  with pytest.raises(ValueError, match="no longer ModelConfig fields"):
    cfg.replace(attention_key_tile=64)
  with pytest.raises(ValueError, match="no longer ModelConfig fields"):
    models.get_config("tiny_gemma", attention_causal_block=128)


def test_old_resolved_model_dicts_still_load():
  """A workdir's config.json from before the kernels moved out still loads (keys dropped)."""
  cfg = models.get_config("tiny_gemma2")
  old = dict(config_to_dict(cfg), attention_impl="xla", attention_query_block=256,
             attention_causal_block=128, attention_key_tile=64)
  assert config_from_dict(old) == cfg
  with pytest.raises(ValueError, match="unknown ModelConfig fields"):
    config_from_dict(dict(old, attention_flavour="x"))


def _packed_inputs(cfg, t=21):
  """Two rows: three packed prompt-shared segments + padding, and one long segment."""
  seg = np.zeros((2, t), np.int32)
  seg[0, :6], seg[0, 6:15], seg[0, 15:19] = 1, 2, 3
  seg[1, :17] = 1
  br = np.zeros_like(seg)
  br[0, 8:11], br[0, 11:15] = 1, 2
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, t), 3, cfg.vocab_size)
  return tokens, jnp.asarray(seg), jnp.asarray(br)


def test_every_xla_kernel_equals_plain_attention():
  """Query blocks, causal blocks and per-row key windows give plain attention's logits at every
  real token (GQA, Gemma 2 soft-capping and local layers, packed prompt-shared rows)."""
  cfg = models.get_config("tiny_gemma2")
  params = models.init_params(cfg, 0)
  tokens, seg, br = _packed_inputs(cfg)
  real = np.asarray(seg) > 0
  fwd = jax.jit(lambda p, k: models.forward(cfg, p, tokens, segment_ids=seg, branch_ids=br,
                                            kernels=k), static_argnums=1)
  want = np.asarray(fwd(params, PLAIN))[real]
  for kernels in (PLAIN.replace(attention_query_block=8),
                  PLAIN.replace(attention_causal_block=4, attention_query_block=8),
                  PLAIN.replace(attention_causal_block=4, attention_query_block=8,
                                attention_key_tile=2),
                  Kernels.for_platform("cpu")):
    got = np.asarray(fwd(params, kernels))[real]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=str(kernels))


def test_default_kernels_are_the_backends():
  cfg = models.get_config("tiny_gemma")
  params = models.init_params(cfg, 0)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 9), 3, cfg.vocab_size)
  np.testing.assert_array_equal(
      models.forward(cfg, params, tokens),
      models.forward(cfg, params, tokens, kernels=Kernels.for_platform(jax.default_backend())))


class _FakeSplash:
  """Stands in for prefjax.models.splash_attention: plain attention from the ids, recording
  what it was called with."""

  def __init__(self):
    self.calls = []

  def splash_attention(self, qg, key, val, *, segment_ids, positions, branch_ids=None,
                       window=None, softcap=None):
    self.calls.append(dict(shape=qg.shape, branch_ids=branch_ids is not None, window=window,
                           softcap=softcap))
    idx = jnp.arange(qg.shape[1], dtype=jnp.int32)
    mask = attention_mask(idx, idx, segment_ids, segment_ids, q_positions=positions,
                          k_positions=positions, window=window, q_branches=branch_ids,
                          k_branches=branch_ids)
    return attend(qg, key, val, mask, softcap)


@pytest.fixture
def fake_splash(monkeypatch):
  fake = _FakeSplash()
  monkeypatch.setitem(sys.modules, "prefjax.models.splash_attention", fake)
  monkeypatch.setattr(models, "splash_attention", fake, raising=False)
  return fake


@pytest.mark.parametrize("scan", [False, True])
def test_splash_dispatch(fake_splash, scan):
  """attention="splash" sends self-attention to splash_attention with the layer context's ids,
  the local layers' window and the soft-cap; readout rows and cached decoding stay on XLA."""
  cfg = models.get_config("tiny_gemma2", scan_layers=scan)
  params = models.init_params(cfg, 0)
  tokens, seg, br = _packed_inputs(cfg)
  real = np.asarray(seg) > 0
  splash = Kernels.for_platform("tpu")
  got = models.forward(cfg, params, tokens, segment_ids=seg, branch_ids=br, kernels=splash)
  want = models.forward(cfg, params, tokens, segment_ids=seg, branch_ids=br, kernels=PLAIN)
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], rtol=1e-5,
                             atol=1e-5)
  period = len(cfg.attention_pattern)
  n = len(fake_splash.calls)  # nn.scan may trace its body more than once
  assert (n % period == 0 and n > 0) if scan else n == cfg.num_layers
  assert {c["window"] for c in fake_splash.calls} == {cfg.sliding_window, None}
  assert all(c["softcap"] == cfg.attn_logit_softcap and c["branch_ids"]
             for c in fake_splash.calls)
  # Reward readout: the trunk through splash, the last layer's readout rows on XLA.
  fake_splash.calls.clear()
  idx = jnp.asarray([[5, 14], [16, 16]], jnp.int32)
  h = models.forward_hidden(cfg, params, tokens, segment_ids=seg, branch_ids=br, readout=idx,
                            kernels=splash)
  h0 = models.forward_hidden(cfg, params, tokens, segment_ids=seg, branch_ids=br, readout=idx,
                             kernels=PLAIN)
  np.testing.assert_allclose(h, h0, rtol=1e-5, atol=1e-5)
  n = len(fake_splash.calls)
  assert (n % period == 0 and n > 0) if scan else n == cfg.num_layers - 1
  # The KV-cache sampler never calls it.
  fake_splash.calls.clear()
  prompts = jnp.asarray([[5, 6, 7, 0], [8, 9, 10, 11]], jnp.int32)
  out = models.sample(cfg, params, prompts, jnp.asarray([3, 4]), max_new_tokens=3,
                      kernels=splash)
  ref = models.sample(cfg, params, prompts, jnp.asarray([3, 4]), max_new_tokens=3,
                      kernels=PLAIN)
  np.testing.assert_array_equal(out.tokens, ref.tokens)
  assert not fake_splash.calls


def test_real_splash_equals_plain_attention():
  """The Pallas kernel itself (interpreted off TPU) through the model."""
  pytest.importorskip("prefjax.models.splash_attention")
  cfg = models.get_config("tiny_gemma2")
  params = models.init_params(cfg, 0)
  tokens, seg, br = _packed_inputs(cfg, t=32)
  real = np.asarray(seg) > 0
  got = models.forward(cfg, params, tokens, segment_ids=seg, branch_ids=br,
                       kernels=Kernels.for_platform("tpu"))
  want = models.forward(cfg, params, tokens, segment_ids=seg, branch_ids=br, kernels=PLAIN)
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], rtol=1e-4,
                             atol=1e-4)
