"""`prefjax.aot`: TPU programs compiled ahead of time on this CPU machine (libtpu needed)."""
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from prefjax import models
from prefjax.aot import chips, flops, hlo

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _run_aot(*args, timeout=600):
  """Runs `python -m prefjax.aot ARGS` in a fresh process; returns (rc, report or None, err)."""
  pytest.importorskip("libtpu", reason="needs libtpu: pip install 'jax[tpu]==0.10.2'")
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  proc = subprocess.run([sys.executable, "-m", "prefjax.aot", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout, check=False)
  last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
  report = json.loads(last) if last.startswith("{") else None
  return proc.returncode, report, proc.stderr


# ----------------------------------------------------------------------------- pure parts


HLO = """HloModule step

%body (p: (s32[], bf16[16,128])) -> (s32[], bf16[16,128]) {
  %p = (s32[], bf16[16,128]{1,0}) parameter(0)
  %x = bf16[4,128]{1,0} get-tuple-element(%p), index=1
  %ag = bf16[16,128]{1,0} all-gather(bf16[4,128]{1,0} %x), channel_id=1, replica_groups={{0,1,2,3}}, dimensions={0}
  ROOT %t = (s32[], bf16[16,128]{1,0}) tuple(%i, %ag)
}

%cond (p: (s32[], bf16[16,128])) -> pred[] {
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%cond.2 (p: (s32[], bf16[16,128])) -> pred[] {
  %limit = s32[]{:T(128)} constant(5)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  ROOT %lt = pred[]{:T(512)} compare(%i, %limit), direction=LT
}

ENTRY %main (a: f32[64,32]) -> f32[16,32] {
  %a = f32[64,32]{1,0} parameter(0)
  %rs = f32[16,32]{1,0} reduce-scatter(f32[64,32]{1,0} %a), channel_id=2, replica_groups={{0,1,2,3}}, dimensions={0}, to_apply=%add
  %w = (s32[], bf16[16,128]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %w2 = (s32[], bf16[16,128]{1,0}) while(%w), condition=%cond.2, body=%body
  %ar = f32[4]{0} all-reduce-start(f32[4]{0} %s), channel_id=3, replica_groups={{0,1,2,3}}, to_apply=%add
  %ard = f32[4]{0} all-reduce-done(f32[4]{0} %ar)
  ROOT %out = f32[16,32]{1,0} copy(%rs)
}
"""


def test_collectives_count_loop_iterations_and_take_the_larger_buffer():
  c = hlo.collectives(HLO)
  # 3 iterations (annotated) + 5 (read off the scan's condition `i < 5`).
  assert c["all-gather"] == {"count": 8, "bytes": 8 * 16 * 128 * 2}
  assert c["reduce-scatter"] == {"count": 1, "bytes": 64 * 32 * 4}
  assert c["all-reduce"] == {"count": 1, "bytes": 16}
  assert c["all-to-all"] == {"count": 0, "bytes": 0}


def test_parse_topology():
  t = chips.parse_topology("v5e:4x4")
  assert (t.chip.name, t.chips, t.chip.hbm_bytes) == ("v5e", 16, 16 * chips.GiB)
  assert chips.parse_topology("v5litepod:2x2", num_slices=2).chips == 8
  assert chips.parse_topology("v4:2x2x2").chip.peak_flops == 275e12
  for bad in ("v5e", "v9:2x2", "v5e:4", "tpu:2x2"):
    with pytest.raises(ValueError, match="unknown TPU topology"):
      chips.parse_topology(bad)


_MATMUL_LEAVES = ("q_einsum", "kv_einsum", "qkv_einsum", "attn_vec_einsum", "gating_einsum",
                  "linear", "lm_head", "reward_head")


@pytest.mark.parametrize("preset", ["tiny_gemma", "tiny_gemma_mha", "tiny_gemma2", "tiny_llama"])
def test_matmul_params_are_the_einsum_weights_of_the_model(preset):
  cfg = models.get_config(preset)
  tree = models.abstract_params(cfg)
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  n = sum(math.prod(x.shape) for path, x in flat
          if any(getattr(p, "key", None) in _MATMUL_LEAVES for p in path)
          and getattr(path[-1], "key", None) != "b")
  if cfg.tie_embeddings:  # the embedding table is the vocabulary head
    n += cfg.vocab_size * cfg.embed_dim
  assert flops.matmul_params_per_token(cfg) == n


def test_attention_flops_window_caps_local_layers():
  cfg = models.get_config("tiny_gemma2")  # local, global, local, global; window 4
  h = cfg.num_heads * cfg.head_dim
  # 4 layers: two local ones see at most 4 keys, two global ones T / 2 = 32 on average.
  assert flops.attention_flops_per_token(cfg, 64) == 2 * (4 * 4 * h) + 2 * (4 * 32 * h)


# ----------------------------------------------------------------------------- compiles


def _param_count(preset="tiny_gemma", **kw):
  return models.count_params(models.abstract_params(models.get_config(preset, **kw)))


def test_tiny_dpo_run_compiles_for_v5e_2x2():
  rc, r, err = _run_aot("--config=configs/dpo_gemma2b.py:runlocal", "--topology=v5e:2x2",
                        "--config.reference.mode=model")
  assert rc == 0, err[-3000:]
  assert r["fits"] and r["chips"] == 4 and r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
  assert set(r["programs"]) == {"train", "eval", "diagnostics"}  # no reference pass
  n = _param_count(vocab_size=32_000)
  # f32 params, two Adam moments and the reference copy, split over 4 chips (the norms'
  # small vectors may be replicated).
  assert r["state_bytes_per_chip"] == pytest.approx(4 * 4 * n / 4, rel=0.02)
  train = r["programs"]["train"]
  assert train["argument_bytes"] >= r["state_bytes_per_chip"]
  assert train["alias_bytes"] >= 0.9 * r["state_bytes_per_chip"]  # the state is donated
  assert train["collectives"]["all-gather"]["count"] > 0  # FSDP gathers the weights
  assert r["rows_per_process"] == {"0": 8}
  assert r["model_flops"]["reference"] == pytest.approx(r["model_flops"]["policy"] / 3)
  assert 0 < r["roofline"]["mfu"] <= 1


def test_multi_host_and_multi_slice_topologies():
  rc, r, err = _run_aot("--config=configs/dpo_gemma2b.py:runlocal", "--topology=v5e:4x4",
                        "--programs=train", "--config.data.batch_size=16")
  assert rc == 0, err[-3000:]
  assert r["processes"] == 4 and r["chips"] == 16
  assert r["rows_per_process"] == {str(p): 4 for p in range(4)}  # each host's grain share
  rc, r, err = _run_aot("--config=configs/dpo_gemma2b.py:runlocal", "--topology=v5e:2x2",
                        "--num_slices=2", "--config.dcn_mesh.data=2", "--programs=train")
  assert rc == 0, err[-3000:]
  assert r["chips"] == 8 and r["processes"] == 2
  assert r["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}


def test_bad_topology_and_indivisible_batch_are_one_line_errors():
  rc, _, err = _run_aot("--config=configs/dpo_gemma2b.py:runlocal", "--topology=v5e:3")
  assert rc == 2 and "unknown TPU topology 'v5e:3'" in err and "Traceback" not in err
  rc, _, err = _run_aot("--config=configs/dpo_gemma2b.py:runlocal", "--topology=v5e:4x4",
                        "--config.data.batch_size=8", "--config.mesh.data=4")
  assert rc == 2 and "config.data.batch_size=8" in err and "Traceback" not in err


@pytest.mark.slow
def test_gemma_2b_dpo_fits_v5e_2x4():
  rc, r, err = _run_aot("--config=configs/dpo_gemma2b.py", "--topology=v5e:2x4",
                        "--programs=train", timeout=3000)
  assert rc == 0, err[-3000:]
  assert r["fits_with_headroom"], r["peak_bytes_per_chip"]
