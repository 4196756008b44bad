"""Smoke tests of the benchmark harnesses: they run and print JSON. No timing is asserted."""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"


def _load(name: str):
  spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
  mod = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = mod  # dataclasses look their module up by name
  spec.loader.exec_module(mod)
  return mod


def _run_stdout_lines(args: list[str], timeout: float, one_device: bool = False) -> list[str]:
  """The stdout lines of a benchmark script (it must exit 0)."""
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  if one_device:  # drop conftest's 8 fake host devices (train_step.py --tiny runs 4 pairs)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if not f.startswith("--xla_force_host_platform_device_count"))
  out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=timeout)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout.strip().splitlines()


def _run(args: list[str], timeout: float, one_device: bool = False) -> dict:
  """The last stdout line of a benchmark script, as JSON."""
  return json.loads(_run_stdout_lines(args, timeout, one_device)[-1])


def test_peak_tiny_prints_json():
  res = _run([str(BENCH / "peak.py"), "--tiny", "--dtypes", "float32"], timeout=300)
  assert res["peak_flops_float32"] > 0
  assert set(res["float32"]["by_size"]) == {"128", "256"}


def test_compare_trl_help():
  out = subprocess.run([sys.executable, str(BENCH / "compare_trl.py"), "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0
  assert "--tiny" in out.stdout and "--groups" in out.stdout


def test_compare_trl_helpers():
  ct = _load("compare_trl")
  spec = ct.tiny_spec(ct.Spec())
  ex = ct.make_examples(spec)
  assert len(ex) == spec.total_steps * spec.batch_pairs
  assert ex == ct.make_examples(spec)  # seeded
  for e in ex:
    assert len(e["prompt_ids"]) == spec.prompt_len
    assert spec.min_response <= len(e["chosen_ids"]) <= spec.max_response
    assert min(e["chosen_ids"] + e["rejected_ids"]) >= 3  # never pad / BOS / EOS
  counts = ct.batch_token_counts(spec, ex)
  first = ex[:spec.batch_pairs]
  assert counts[0]["real_tokens"] == sum(2 * len(e["prompt_ids"]) + len(e["chosen_ids"])
                                         + len(e["rejected_ids"]) for e in first)
  # 46M benchmark model: N (matmul params incl. the tied LM head) ~ 46M.
  assert 45e6 < ct.matmul_params(ct.Spec()) < 47e6
  f = ct.model_flops(spec, counts[0], train_passes=1, ref_passes=1)
  g = ct.model_flops(spec, counts[0], train_passes=1, ref_passes=0)
  assert f == pytest.approx(g * 4 / 3)


def test_compare_trl_auto_row_len():
  """Hand-worked first-fit: the row length with the fewest slots, ties to the shorter row."""
  ct = _load("compare_trl")
  # 512: rows [300+200, 300+200] = 1024 slots; 768: [300+300, 200+200] = 1536; 1024: one row
  # of 1000 = 1024 slots, a tie that goes to 512.
  assert ct.auto_row_len([[300, 300, 200, 200]]) == 512
  assert ct.auto_row_len([[600]]) == 768  # the longest feature rounded up to the block
  # Every step gets the same shape: the worst step decides. 512 needs 2 rows in step 2 (1024
  # slots); 768 fits both steps in one row (768 slots).
  assert ct.auto_row_len([[250, 250], [300, 300, 100]]) == 768
  # block 128: 384 needs 3 rows (1152 slots), 512 two ([300+100, 300], 1024), 640 two (1280).
  assert ct.auto_row_len([[300, 300, 100]], block=128, max_len=640) == 512
  # The benchmark's own batches: prompt-shared pairs (prompt 64 + two responses of 64-192)
  # fill 768-token rows 4 to a step, [4, 768] instead of the padded [8, 512] slots.
  spec = ct.Spec()
  from prefjax.data.packing import prompt_shared_features
  ex = ct.make_examples(spec)
  lens = [[len(prompt_shared_features(e["prompt_ids"], [e["chosen_ids"], e["rejected_ids"]])
               ["tokens"]) for e in ex[s * 8:(s + 1) * 8]] for s in range(spec.total_steps)]
  assert ct.auto_row_len(lens, max_len=1024) == 768


def test_train_step_flops_match_compare_trl():
  """train_step.py's model FLOPs (segment lengths from segment_ids, packed rows included) equal
  compare_trl.py's (lengths from the examples), for a live reference and without one."""
  ts, ct = _load("train_step"), _load("compare_trl")
  from prefjax import models
  spec, tiny = ct.Spec(), ct.tiny_spec(ct.Spec())
  every = ct.make_examples(tiny)
  counts, ex = ct.batch_token_counts(tiny, every)[0], every[:tiny.batch_pairs]
  lengths = [len(e["prompt_ids"]) + len(e[k]) for e in ex for k in ("chosen_ids", "rejected_ids")]
  assert counts["sum_sq_len"] == sum(n * n for n in lengths)
  seg = np.zeros((2, sum(lengths)), np.int32)  # row 0: all sequences packed; row 1: padding
  at = 0
  for i, n in enumerate(lengths):
    seg[0, at:at + n] = i + 1
    at += n
  assert ts.sum_sq_segment_lengths(seg) == counts["sum_sq_len"]
  cfg = models.get_config("bench_46m")
  n = ct.matmul_params(spec)
  for ref, passes in (("model", 1), ("none", 0)):
    want = ct.model_flops(spec, counts, train_passes=1, ref_passes=passes)
    got = ts.model_flops(n, counts["real_tokens"], ref,
                         ts.attention_flops(cfg, ts.sum_sq_segment_lengths(seg)))
    assert got == pytest.approx(want, rel=1e-12)
    # Counting the vocabulary head at fewer positions removes 2·V·D per position and pass.
    vd = cfg.vocab_size * cfg.embed_dim
    fewer = ts.model_flops(n, counts["real_tokens"], ref,
                           ts.attention_flops(cfg, counts["sum_sq_len"]), vd, 100)
    assert got - fewer == pytest.approx((3 + passes) * 2 * vd * (counts["real_tokens"] - 100))


def test_pad_pairs_matches_trl_masking():
  """loss_mask marks exactly the completion targets, as TRL's completion_mask shifted by one."""
  ct = _load("compare_trl")
  spec = ct.tiny_spec(ct.Spec())
  ex = ct.make_examples(spec)[:2]
  b = ct._pad_pairs(spec, ex, spec.prompt_len + spec.max_response)
  for i, e in enumerate(ex):
    for j, resp in enumerate((e["chosen_ids"], e["rejected_ids"])):
      mask = b["loss_mask"][i, j]
      assert mask.sum() == len(resp)
      picked = b["targets"][i, j][mask > 0].tolist()
      assert picked == list(resp)


@pytest.mark.slow
@pytest.mark.parity
def test_compare_trl_tiny_reward_agrees():
  pytest.importorskip("trl")
  res = _run([str(BENCH / "compare_trl.py"), "--tiny", "--groups", "reward", "dpo_ref",
              "--no-extras", "--peak-flops", "1e10"], timeout=1800)
  for k in ("speedup_equal_work", "speedup_best", "reward_speedup", "memory_ratio_equal_work",
            "first_loss_rel_diff"):
    assert k in res
  assert res["first_loss_rel_diff"] < 1e-4


def test_scaling_tiny_sweeps_print_json():
  """benchmarks/scaling.py runs train_step.py per point; tiny model, one point per sweep."""
  s = _run([str(BENCH / "scaling.py"), "--preset", "tiny_gemma", "--sweeps", "seq,compile",
            "--seq", "96", "--layers", "2", "--steps", "1", "--warmup", "0"], timeout=600)
  assert s["summary"] and set(s["seq"]) == {"96"}
  assert s["seq"]["96"]["step_s"] > 0 and s["seq"]["96"]["real_tokens_per_s"] > 0
  assert set(s["compile_s"]) == {"2", "2_scan"} and all(v > 0 for v in s["compile_s"].values())


def test_train_step_mfu_against_the_peaks_around_each_step():
  """--peak-between-steps: each step's MFU is its FLOPs / its time / the mean of the two peaks
  measured around it (`mfu` rescaled from the start peak); `mfu_adjacent` is their median."""
  r = _run([str(BENCH / "train_step.py"), "--tiny", "--tasks", "simpo", "--layouts", "padded",
            "--peak-between-steps"], timeout=600, one_device=True)
  times, peaks = r["step_times_s"], r["peak_flops_adjacent"]
  assert len(times) == 2 and len(peaks) == 3 and all(p > 0 for p in peaks)
  flops = r["model_flops_per_step"]
  np.testing.assert_allclose(r["mfu"], flops / np.median(times) / r["peak_flops"], rtol=1e-4)
  per_step = [flops / t / ((peaks[j] + peaks[j + 1]) / 2) for j, t in enumerate(times)]
  np.testing.assert_allclose(r["mfu_adjacent"], np.median(per_step), rtol=0.02)
  np.testing.assert_allclose(r["mfu_adjacent_range"], [min(per_step), max(per_step)], rtol=0.02)


def _needs_hf_checkpoints():
  """compare_trl builds its HF checkpoints with torch + transformers (the parity extra)."""
  pytest.importorskip("torch")
  pytest.importorskip("transformers")


def test_compare_trl_logps_implementation_choice():
  """auto: the equal-work config keeps the memory-lean default head, the rest save logits;
  an explicit choice applies to every configuration; the CLI rejects unknown names."""
  ct = _load("compare_trl")
  assert ct.logps_implementation_for("dpo_ref") == "custom_vjp"
  for config in ("dpo_precomputed", "dpo_precomputed_shared", "dpo_ref_shared", "simpo"):
    assert ct.logps_implementation_for(config) == "saved_logits"
    assert ct.logps_implementation_for(config, "custom_vjp") == "custom_vjp"
  assert ct.logps_implementation_for("dpo_ref", "saved_logits") == "saved_logits"
  from prefjax.ops.logprobs import IMPLEMENTATIONS
  out = subprocess.run([sys.executable, str(BENCH / "compare_trl.py"),
                        "--prefjax-logps-implementation", "nope"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 2 and "invalid choice" in out.stderr
  for name in IMPLEMENTATIONS:  # every library implementation is selectable
    assert name in out.stderr


def test_compare_trl_causal_block_choice():
  """auto: every config but the equal-work one takes SHORT_CAUSAL_BLOCK, dpo_ref the model
  default; an explicit number applies to all; bad values are refused by the CLI before any
  work."""
  ct = _load("compare_trl")
  assert ct.EQUAL_WORK_CONFIG == "dpo_ref" and ct.causal_block_for("dpo_ref") is None
  for config in ct.REWARD_CONFIGS + ("dpo_precomputed", "dpo_precomputed_shared", "simpo",
                                     "dpo_ref_shared"):
    assert ct.causal_block_for(config) == ct.SHORT_CAUSAL_BLOCK == 128
  for config in ("dpo_ref", "dpo_precomputed", "dpo_precomputed_shared", "simpo"):
    assert ct.causal_block_for(config, "64") == 64
    assert ct.causal_block_for(config, "0") == 0
  assert ct.causal_block_for("reward_shared", "default") is None
  assert ct.causal_block_for("reward_shared", -1) is None
  for bad in ("-5", "big"):
    with pytest.raises(ValueError, match="causal block"):
      ct.causal_block_for("reward", bad)
  out = subprocess.run([sys.executable, str(BENCH / "compare_trl.py"),
                        "--prefjax-causal-block", "big"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 2 and "causal block 'big'" in out.stderr
  for bad in ("-5", "wide"):
    with pytest.raises(argparse.ArgumentTypeError, match="key slots per window step"):
      ct._key_tile_arg(bad)
  assert [ct._key_tile_arg(v) for v in ("-1", "0", "64")] == [-1, 0, 64]


@pytest.mark.parity
def test_compare_trl_tiny_prefjax_layouts_agree_sequential(tmp_path):
  """The prompt-shared reward config gives the padded config's first loss (same pairs), and
  the sequential schedule steps every worker; prefjax side only (no TRL needed). `--out`
  holds the final JSON and no leftover per-group `.partial` file."""
  _needs_hf_checkpoints()
  out = tmp_path / "result.json"
  res = _run([str(BENCH / "compare_trl.py"), "--tiny", "--sides", "prefjax", "--groups",
              "reward", "--schedule", "sequential", "--peak-flops", "1e10", "--out", str(out)],
             timeout=900)
  assert json.loads(out.read_text()) == res
  assert not (tmp_path / "result.json.partial").exists()
  assert res["sides"]["prefjax:reward_shared"]["attention_causal_block"] == 128
  assert res["sides"]["prefjax:reward_shared"]["attention_key_tile"] == 64
  assert res["sides"]["prefjax:reward_shared"]["kernels"]["attention_key_tile"] == 64
  sides = res["sides"]
  assert res["spec"]["schedule"] == "sequential"
  assert sides["prefjax:reward_shared"]["layout"] == "prompt_shared"
  assert len(sides["prefjax:reward_shared"]["losses"]) == res["spec"]["steps"] + 1
  np.testing.assert_allclose(sides["prefjax:reward_shared"]["first_loss"],
                             sides["prefjax:reward"]["first_loss"], rtol=1e-5)


@pytest.mark.parity
def test_hf_flax_tree_matches_prefjax_importer(tmp_path):
  """compare_trl's numpy HF -> Flax-names tree (what the tunix peer is built from) equals
  prefjax.models.load_hf_checkpoint on the same HF files (an independent converter)."""
  _needs_hf_checkpoints()
  from prefjax import models
  ct = _load("compare_trl")
  spec = ct.tiny_spec(ct.Spec(workdir=str(tmp_path)))
  ct.build_checkpoints(spec)
  _, tree = ct._hf_gemma1_to_flax_tree(str(tmp_path / "policy"))
  _, params = models.load_hf_checkpoint(str(tmp_path / "policy"))
  flat = lambda t: {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)  # noqa: E731
                    for path, v in __import__("jax").tree_util.tree_flatten_with_path(t)[0]}
  a, b = flat(tree), flat(params)
  assert set(a) <= set(b), sorted(set(a) - set(b))
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parity
def test_compare_trl_peer_reported_when_unavailable(tmp_path):
  """`--peer tunix` with an interpreter that cannot import tunix: the peer is reported as
  skipped with the reason and the prefjax side still runs (with tunix importable, it runs and
  its first loss must match prefjax's)."""
  _needs_hf_checkpoints()
  peer_python = os.environ.get("PREFJAX_PEER_PYTHON", sys.executable)
  res = _run([str(BENCH / "compare_trl.py"), "--tiny", "--sides", "prefjax", "--groups",
              "dpo_ref", "--no-extras", "--peer", "tunix", "--peer-python", peer_python,
              "--schedule", "sequential", "--peak-flops", "1e10"], timeout=900)
  status = res["peers"]["tunix"]
  if status == "ran":
    np.testing.assert_allclose(res["sides"]["tunix:dpo_ref"]["first_loss"],
                               res["sides"]["prefjax:dpo_ref"]["first_loss"], rtol=1e-5)
    assert res["speedup_vs_tunix_equal_work"] > 0
  else:
    assert status.startswith("skipped:") and "tunix" in status
    assert "tunix:dpo_ref" not in res["sides"] and res["speedup_vs_tunix_equal_work"] is None
  assert res["sides"]["prefjax:dpo_ref"]["first_loss"] > 0
  assert res["spec"]["prefjax_scan_layers"] is True


@pytest.mark.parity
def test_step_memory_tiny_variants_agree():
  """benchmarks/step_memory.py: one process per scheduling variant; same losses."""
  _needs_hf_checkpoints()
  lines = subprocess.run(
      [sys.executable, str(BENCH / "step_memory.py"), "--tiny", "--steps", "1", "--variants",
       "memory_optimized:1:none", "concurrency_optimized:0:full"], cwd=ROOT,
      env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=900)
  assert lines.returncode == 0, lines.stderr[-3000:]
  rows = [json.loads(l) for l in lines.stdout.strip().splitlines()]
  assert [r.get("error") for r in rows] == [None, None]
  assert rows[0]["scan_layers"] and rows[1]["remat"] == "full"
  np.testing.assert_allclose(rows[0]["losses"], rows[1]["losses"], rtol=1e-5)
  assert all(r["peak_rss_gib"] > 0 and r["median_step_s"] > 0 for r in rows)


def test_profile_summary_dot_flops_from_hlo():
  """FLOPs of a dot fusion read off HLO text: 2·M·N·K, batch dims included."""
  ps = _load("profile_summary")
  hlo = """%fused_computation.1 (p0: f32[2,8,16], p1: f32[2,16,4]) -> f32[2,8,4] {
  %p0 = f32[2,8,16]{2,1,0} parameter(0)
  %p1 = f32[2,16,4]{2,1,0} parameter(1)
  ROOT %dot.1 = f32[2,8,4]{2,1,0} dot(%p0, %p1), lhs_batch_dims={0}, lhs_contracting_dims={2}, rhs_batch_dims={0}, rhs_contracting_dims={1}
}

ENTRY %main (a: f32[2,8,16], b: f32[2,16,4]) -> f32[2,8,4] {
  %a = f32[2,8,16]{2,1,0} parameter(0)
  %b = f32[2,16,4]{2,1,0} parameter(1)
  ROOT %ynn_fusion.1 = f32[2,8,4]{2,1,0} fusion(%a, %b), kind=kCustom, calls=%fused_computation.1, metadata={op_name="jit(f)/layers/mlp/BTD,DF->BTF/dot_general"}
}
"""
  info = ps.parse_hlo(hlo)["ynn_fusion.1"]
  assert info["flops"] == 2 * 2 * 8 * 4 * 16
  assert ps.part_of(info) == "mlp"


@pytest.mark.slow
def test_profile_summary_reads_a_traced_tiny_step(tmp_path):
  """train_step.py --profile-dir writes a trace and the HLO; profile_summary joins them."""
  out = tmp_path / "prof"
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]  # one device
  env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS=" ".join(flags))
  r = subprocess.run([sys.executable, str(BENCH / "train_step.py"), "--tiny", "--tasks", "simpo",
                      "--layouts", "padded", "--profile-dir", str(out)], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  s = _run([str(BENCH / "profile_summary.py"), str(out), "--json"], timeout=300)
  assert s["op_ms"] > 0 and s["ops"]
  assert "mlp" in s["parts"] and s["parts"]["mlp"]["gflop"] > 0


def test_train_step_layouts_of_the_same_hh_pairs_agree():
  """--data hh: the shipped HH-RLHF pairs as padded pairs and prompt-shared rows give the same
  first-step loss (one layer of bench_46m, 3 pairs; reward and DPO; packed rows against padded
  ones: tests/train/test_tasks.py), and the prompt-shared rows hold fewer slots while counting
  the same pair tokens."""
  lines = _run_stdout_lines([str(BENCH / "train_step.py"), "--preset", "bench_46m", "--layers", "1",
                             "--batch", "3", "--prompt-len", "16", "--min-response", "8",
                             "--max-response", "24", "--steps", "1", "--warmup", "0",
                             "--peak-flops", "1e11", "--data", "hh", "--tasks", "reward,dpo",
                             "--layouts", "padded,prompt_shared"], timeout=900,
                            one_device=True)
  res = {(d["task"], d["layout"]): d for d in map(json.loads, lines)}
  assert len(res) == 4 and all(d["data"] == "hh" for d in res.values())
  for task in ("reward", "dpo"):
    pad, shared = res[task, "padded"], res[task, "prompt_shared"]
    np.testing.assert_allclose(shared["loss"], pad["loss"], rtol=1e-4)
    assert pad["batch_shape"] == [3, 2, 40] and len(shared["batch_shape"]) == 2
    assert shared["pair_tokens"] == pad["real_tokens"] == pad["pair_tokens"]
    assert shared["real_tokens"] < pad["real_tokens"]


def test_train_step_rejects_unknown_layouts_and_small_vocab_for_hh():
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  bad = subprocess.run([sys.executable, str(BENCH / "train_step.py"), "--tiny", "--layouts",
                        "padded,zigzag"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
  assert bad.returncode == 2 and "zigzag" in bad.stderr and "prompt_shared" in bad.stderr
  small = subprocess.run([sys.executable, str(BENCH / "train_step.py"), "--tiny", "--data", "hh",
                          "--tasks", "reward", "--layouts", "padded", "--peak-flops", "1e11"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert small.returncode != 0 and "vocabulary" in small.stderr and "Traceback" not in small.stderr
