r"""Compile every TPU recipe for its pods ahead of time (`prefjax.aot`), one JSON line each.

Each recipe names its target slice in its docstring; the matrix compiles it there, on the
next smaller slice it should still fit, and on a large pod (with the global batch scaled to
the pod and, where the batch cannot cover every chip, tensor parallelism). No TPU is needed
(libtpu compiles on this machine: `pip install "jax[tpu]==0.10.2"`); a 7B step takes minutes
on 2 cores. Lines are appended to --out; `scripts/tpu_docs.py` turns them into docs/tpu.md.

  python benchmarks/tpu_compile.py --out docs/bench/tpu_aot.jsonl
  python benchmarks/tpu_compile.py --recipes dpo_gemma7b --roles target --out /tmp/x.jsonl
  python benchmarks/tpu_compile.py --recipes sft_gemma7b_anchor,dpo_gemma7b_anchor --roles anchor \
      --out docs/bench/tpu_aot.jsonl
  python benchmarks/tpu_compile.py --recipes dpo_gemma7b --roles target --variant splash_off \
      --override kernels.attention=xla --out docs/bench/tpu_aot.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

# recipe -> [(role, topology, extra --config overrides)]. The smaller slice has fewer chips with
# more HBM each (a v5e chip's 16 GiB holds about 1.3 B parameters' train state and step
# temporaries, so fewer v5e chips do not fit) and keeps the recipe's global batch in
# micro-batches; the 256-chip pod scales the global batch.
POD = ("pod", "v5e:16x16", ["data.batch_size=256"])
SMALLER_2B = ("smaller", "v4:2x2x1", ["optim.grad_accum_steps=2"])
SMALLER_7B = ("smaller", "v5p:2x2x1", ["optim.grad_accum_steps=8"])
MATRIX: dict[str, list[tuple[str, str, list[str]]]] = {
    "sft_gemma2b": [("target", "v5e:2x4", []), SMALLER_2B, POD],
    "rm_gemma2b": [("target", "v5e:2x4", []), SMALLER_2B, POD],
    "dpo_gemma2b": [("target", "v5e:2x4", []), SMALLER_2B, POD],
    "orpo_gemma2b": [("target", "v5e:2x4", []), SMALLER_2B, POD],
    "kto_gemma2b": [("target", "v5e:2x4", []), SMALLER_2B, POD],
    "rm_gemma7b": [("target", "v5e:4x8", []), SMALLER_7B, POD],
    "dpo_gemma7b": [("target", "v5e:4x8", []), SMALLER_7B, POD],
    "simpo_gemma2_9b": [("target", "v5e:4x8", []), SMALLER_7B, POD],
    # MaxText's Gemma-7B SFT step was compiled at 2 sequences of 1024 per chip on v5e:4x4
    # (docs/bench/maxtext_gemma7b_aot.jsonl); prefjax's SFT and DPO steps at the same tokens.
    "sft_gemma7b_anchor": [("anchor", "v5e:4x4", [])],
    "dpo_gemma7b_anchor": [("anchor", "v5e:4x4", []), ("anchor_precomputed", "v5e:4x4",
                                                         ["reference.mode=precomputed"])],
}
# Matrix rows that are a recipe with overrides: row name -> (recipe, overrides, variant).
ALIASES = {
    "sft_gemma7b_anchor": ("sft_gemma2b", ["model.preset=gemma_7b", "data.batch_size=32"],
                           "maxtext_anchor"),
    "dpo_gemma7b_anchor": ("dpo_gemma7b", ["data.batch_size=16"], "maxtext_anchor"),
}


def compile_one(recipe: str, role: str, topology: str, overrides: list[str], variant: str,
                programs: str, timeout: int) -> dict:
  """Runs `python -m prefjax.aot` in a fresh process; returns its JSON report (+ labels)."""
  cmd = [sys.executable, "-m", "prefjax.aot", f"--config=configs/{recipe}.py",
         f"--topology={topology}", f"--programs={programs}",
         *[f"--config.{o}" for o in overrides]]
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                        check=False)
  lines = proc.stdout.strip().splitlines()
  label = {"recipe": recipe, "role": role, "variant": variant, "overrides": overrides,
           "command": "python -m prefjax.aot " + " ".join(cmd[3:]),
           "wall_s": round(time.perf_counter() - t0, 1),
           "date": time.strftime("%Y-%m-%d")}
  if proc.returncode != 0 or not lines or not lines[-1].startswith("{"):
    return {**label, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
  return {**label, **json.loads(lines[-1])}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--recipes", default=",".join(MATRIX),
                 help="comma-separated recipe names (and the *_anchor rows)")
  p.add_argument("--roles", default="target,smaller,pod", help="which rows of each recipe")
  p.add_argument("--override", action="append", default=[],
                 help="extra --config.KEY=VALUE for every compile (repeatable)")
  p.add_argument("--variant", default="default", help="label of this set of overrides")
  p.add_argument("--programs", default="train,eval,diagnostics,reference")
  p.add_argument("--timeout", type=int, default=3600, help="seconds per compile")
  p.add_argument("--out", required=True, help="JSON lines file to append to")
  a = p.parse_args()
  roles = a.roles.split(",")
  for recipe in a.recipes.split(","):
    if recipe not in MATRIX:
      p.error(f"unknown recipe {recipe!r}; known: {', '.join(MATRIX)}")
    for role, topology, extra in MATRIX[recipe]:
      if role not in roles and not (recipe in ALIASES and "anchor" in roles):
        continue
      name, variant, base = recipe, a.variant, []
      if recipe in ALIASES:
        name, base, variant = ALIASES[recipe]
      r = compile_one(name, role, topology, base + extra + a.override, variant, a.programs,
                      a.timeout)
      line = json.dumps(r, sort_keys=True)
      print(line, flush=True)
      os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
      with open(a.out, "a", encoding="utf-8") as f:
        f.write(line + "\n")


if __name__ == "__main__":
  main()
