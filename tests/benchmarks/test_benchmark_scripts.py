"""Smoke tests of the benchmark harnesses: they run and print JSON. No timing is asserted."""
from __future__ import annotations

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


def _run(args: list[str], timeout: float) -> dict:
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=timeout)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


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


def test_compare_trl_tiny_prefjax_layouts_agree_sequential():
  """The prompt-shared reward config gives the padded config's first loss (same pairs), and
  the sequential schedule steps every worker; prefjax side only (no TRL needed)."""
  res = _run([str(BENCH / "compare_trl.py"), "--tiny", "--sides", "prefjax", "--groups",
              "reward", "--schedule", "sequential", "--peak-flops", "1e10"], timeout=900)
  sides = res["sides"]
  assert res["spec"]["schedule"] == "sequential"
  assert sides["prefjax:reward_shared"]["layout"] == "prompt_shared"
  assert len(sides["prefjax:reward_shared"]["losses"]) == res["spec"]["steps"] + 1
  np.testing.assert_allclose(sides["prefjax:reward_shared"]["first_loss"],
                             sides["prefjax:reward"]["first_loss"], rtol=1e-5)
