r"""Regenerates the tables of docs/tpu.md from the JSON lines of the AOT compiles.

  python scripts/tpu_docs.py            # reads docs/bench/tpu_aot.jsonl (+ maxtext_gemma7b_aot.jsonl)

Also writes the short per-recipe summary into README.md. Each table sits between `<!-- NAME:begin -->` and `<!-- NAME:end -->` markers in docs/tpu.md;
the text around them is left alone. When a (recipe, role, topology, variant) was compiled
more than once, the last line wins.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
GiB = 1024 ** 3


def read_jsonl(path: pathlib.Path) -> list[dict]:
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
          if line.strip()]


def latest(rows: list[dict]) -> list[dict]:
  """The last line of every (recipe, role, topology, variant), in first-seen order."""
  out: dict[tuple, dict] = {}
  for r in rows:
    out[(r.get("recipe"), r.get("role"), r.get("topology"), r.get("variant"))] = r
  return list(out.values())


def _gib(b: float) -> str:
  return f"{b / GiB:.2f}"


def _coll(r: dict) -> str:
  c = r.get("programs", {}).get("train", {}).get("collectives", {})
  return f"{sum(v['bytes'] for v in c.values()) / GiB:.1f}" if c else "–"


def _fit(r: dict) -> str:
  if "error" in r:
    return "error"
  head = f"{100 * r['headroom']:.0f}%"
  if not r["fits"]:
    return "**no**"
  return f"yes ({head})" if r["fits_with_headroom"] else f"tight ({head})"


def _compile_s(r: dict) -> str:
  return f"{sum(p['compile_s'] for p in r.get('programs', {}).values()):.0f}"


def _shape(r: dict) -> str:
  """`rows×...×length` of the batch's token array."""
  tok = r["batch"]["tokens"]
  return f"{tok[0]}×{'×'.join(str(t) for t in tok[1:])}"


def _roofline(r: dict, bound: bool = False) -> tuple[str, str]:
  """(roofline step, MFU bound) cells, dashes when the step did not compile."""
  rf = r.get("roofline")
  if not rf:
    return "–", "–"
  tag = f" ({rf['bound'][0]})" if bound else ""
  return f"{rf['step_s'] * 1e3:.0f} ms{tag}", f"{100 * rf['mfu']:.0f}%"


def _overrides(r: dict) -> str:
  o = [x for x in r.get("overrides", [])]
  return "<br>".join(f"`{x}`" for x in o) if o else ""


def recipe_table(rows: list[dict], variant: str = "default") -> str:
  head = ("| recipe | role | topology (chips, hosts) | mesh | batch × length | overrides | "
          "HBM / chip GiB | fits (headroom) | compile s | roofline step | MFU bound | "
          "collectives GiB / step |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
  lines = [head]
  roles = {"target": 0, "smaller": 1, "pod": 2}
  rows = sorted(rows, key=lambda r: (r.get("recipe", ""), roles.get(r.get("role"), 9)))
  for r in rows:
    if r.get("variant") != variant:
      continue
    if "error" in r:
      lines.append(f"| {r['recipe']} | {r['role']} | {r.get('topology', '?')} | | | "
                   f"{_overrides(r)} | | error: {r['error']} | | | | |")
      continue
    mesh = "×".join(str(v) for v in r["mesh"].values())
    step, mfu = _roofline(r, bound=True)
    lines.append(
        f"| {r['recipe']} | {r['role']} | {r['topology']} ({r['chips']}, {r['processes']}) | "
        f"{mesh} | {_shape(r)} | {_overrides(r)} | "
        f"{_gib(r['peak_bytes_per_chip'])} | {_fit(r)} | {_compile_s(r)} | {step} | {mfu} | "
        f"{_coll(r)} |")
  return "\n".join(lines)


def variant_table(rows: list[dict], recipe: str, variants: tuple[str, ...]) -> str:
  lines = ["| variant | topology | batch × length | HBM / chip GiB | temp GiB | fits | "
           "roofline step | MFU bound | compile s |", "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if (r.get("recipe") != recipe or r.get("role") != "target"
        or r.get("variant") not in variants or "error" in r):
      continue
    step, mfu = _roofline(r)
    lines.append(
        f"| {r['variant']} | {r['topology']} | {_shape(r)} | "
        f"{_gib(r['peak_bytes_per_chip'])} | {_gib(r['programs']['train']['temp_bytes'])} | "
        f"{_fit(r)} | {step} | {mfu} | {_compile_s(r)} |")
  return "\n".join(lines)


def maxtext_table(prefjax_rows: list[dict], maxtext_rows: list[dict]) -> str:
  lines = ["| step | tool | topology | sequences × length | per-chip args GiB | temp GiB | "
           "total GiB | fits 16 GiB | compile s |", "|---|---|---|---|---|---|---|---|---|"]
  maxtext_rows = sorted(maxtext_rows, key=lambda m: (m.get("global_batch", 0), m.get(
      "attention", ""), m.get("num_vocab_tiling", 1)))
  for m in maxtext_rows:
    if m["topology"] != "v5e:4x4" or m.get("total_bytes") is None or m.get("compile_s") is None:
      continue
    lines.append(
        f"| SFT (LM loss) | MaxText {m.get('maxtext_version', '')} ({m.get('attention', '')}"
        f"{', vocab tiles ' + str(m['num_vocab_tiling']) if m.get('num_vocab_tiling', 1) > 1 else ''}) | "
        f"{m['topology']} | {m['global_batch']}×{m['seq_len']} | "
        f"{_gib(m['argument_bytes'])} | {_gib(m['temp_bytes'])} | {_gib(m['total_bytes'])} | "
        f"{'yes' if m['fits_16GiB'] else 'no'} | {m['compile_s']:.0f} |")
  for r in prefjax_rows:
    if r.get("variant") != "maxtext_anchor" or "error" in r:
      continue
    t = r["programs"]["train"]
    tok = r["batch"]["tokens"]
    seqs = tok[0] * (tok[1] if len(tok) == 3 else 1)
    kind = {"sft": "SFT (LM loss)", "preference": f"DPO, reference {r['reference_mode']}"}.get(
        r["task"], r["task"])
    lines.append(
        f"| {kind} | prefjax | {r['topology']} | {seqs}×{tok[-1]} | "
        f"{_gib(t['argument_bytes'])} | {_gib(t['temp_bytes'])} | "
        f"{_gib(r['peak_bytes_per_chip'])} | {'yes' if r['fits'] else 'no'} | "
        f"{_compile_s(r)} |")
  return "\n".join(lines)


def summary_table(rows: list[dict]) -> str:
  """The README's short version: each recipe on its target slice."""
  lines = ["| recipe | TPU slice | HBM / chip | headroom | roofline step | MFU bound |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    if r.get("role") != "target" or r.get("variant") != "default" or "error" in r:
      continue
    rf = r.get("roofline") or {}
    lines.append(
        f"| `{r['recipe']}` | {r['topology']} ({r['chips']} chips) | "
        f"{r['peak_bytes_per_chip'] / GiB:.1f} / {r['hbm_per_chip_bytes'] / GiB:.0f} GiB | "
        f"{100 * r['headroom']:.0f}% | {rf.get('step_s', 0) * 1e3:.0f} ms | "
        f"{100 * rf.get('mfu', 0):.0f}% |")
  return "\n".join(lines)


def replace_block(text: str, name: str, body: str) -> str:
  pat = re.compile(rf"(<!-- {name}:begin -->\n)(?:.*?\n)?(<!-- {name}:end -->)", re.S)
  if not pat.search(text):
    raise SystemExit(f"no <!-- {name}:begin/end --> markers")
  return pat.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--prefjax", default=str(ROOT / "docs/bench/tpu_aot.jsonl"))
  p.add_argument("--maxtext", default=str(ROOT / "docs/bench/maxtext_gemma7b_aot.jsonl"))
  p.add_argument("--doc", default=str(ROOT / "docs/tpu.md"))
  a = p.parse_args()
  rows = latest(read_jsonl(pathlib.Path(a.prefjax)))
  doc = pathlib.Path(a.doc)
  text = doc.read_text(encoding="utf-8")
  text = replace_block(text, "recipes", recipe_table(rows))
  text = replace_block(text, "splash", variant_table(
      rows, "dpo_gemma7b", ("default", "xla_attention", "splash_T2048", "xla_T2048",
                            "splash_T8192", "xla_T8192", "splash_T8192_tensor2")))
  text = replace_block(text, "maxtext", maxtext_table(rows, read_jsonl(pathlib.Path(a.maxtext))))
  doc.write_text(text, encoding="utf-8")
  readme = ROOT / "README.md"
  readme.write_text(replace_block(readme.read_text(encoding="utf-8"), "tpu-summary",
                                  summary_table(rows)), encoding="utf-8")
  print(f"wrote {doc} and the summary in {readme}")


if __name__ == "__main__":
  main()
