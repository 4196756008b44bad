"""Markdown tables of a `scripts/reproduce_lin2024.sh` run directory.

  python scripts/lin2024_table.py /tmp/lin2024 > summary.md

Reads `seed*/eval/eval_results.json` (one per seed), `iter_{explicit,implicit}/
iterative_metrics.jsonl` and `generate/generation_eval.json`, and prints:
  1. accuracy per eval set of the explicit RM and of the DPO implicit reward, mean ± sample
     std over seeds (ties excluded, as in eval_results.json), with the implicit − explicit
     difference;
  2. ID mean, OOD mean and the ID − OOD drop per kind (mean ± std over seeds);
  3. iterative DPO per iteration (annotator reward, KL estimate, length, pairs kept);
  4. generation RM scores per policy.
Missing parts are skipped, so it also summarises a partial run.
"""
from __future__ import annotations

import json
import pathlib
import statistics
import sys

KINDS = ("explicit", "implicit")


def mean_std(xs: list) -> str:
  xs = [x for x in xs if x is not None and x == x]  # None / NaN: not measured
  if not xs:
    return "–"
  if len(xs) == 1:
    return f"{xs[0]:.3f}"
  return f"{statistics.fmean(xs):.3f} ± {statistics.stdev(xs):.3f}"


def eval_tables(root: pathlib.Path) -> list[str]:
  files = sorted(root.glob("seed*/eval/eval_results.json"))
  if not files:
    return []
  results = [json.loads(f.read_text()) for f in files]
  seeds = [f.parts[-3] for f in files]
  tags = results[0]["tags"]
  out = [f"Seeds: {', '.join(seeds)} ({len(seeds)}); mean ± sample std over seeds.", "",
         "| set | tag | pairs | explicit RM | DPO implicit | implicit − explicit |",
         "|---|---|---:|---:|---:|---:|"]
  for name, tag in tags.items():
    acc = {k: [r["models"][k]["sets"][name]["accuracy"] for r in results] for k in KINDS}
    diff = [i - e for e, i in zip(acc["explicit"], acc["implicit"])]
    n = results[0]["models"]["explicit"]["sets"][name].get("n_pairs", "")
    out.append(f"| {name} | {tag} | {n} | {mean_std(acc['explicit'])} | "
               f"{mean_std(acc['implicit'])} | {mean_std(diff)} |")
  out += ["", "Length bias (`length_bias` in eval_results.json): how often the longer response of a "
          "pair is the chosen one, and how often each reward scores the longer one higher.", "",
          "| set | chosen is longer | explicit prefers longer | implicit prefers longer |",
          "|---|---:|---:|---:|"]
  for name in tags:
    lb = {k: [r["models"][k]["sets"][name]["length_bias"] for r in results] for k in KINDS}
    out.append(f"| {name} | {mean_std([lb['explicit'][0]['frac_chosen_longer']])} | "
               f"{mean_std([x['frac_longer_preferred'] for x in lb['explicit']])} | "
               f"{mean_std([x['frac_longer_preferred'] for x in lb['implicit']])} |")
  out += ["", "| kind | ID mean | OOD mean | ID − OOD drop |", "|---|---:|---:|---:|"]
  for k in KINDS:
    s = [r["models"][k]["summary"] for r in results]
    out.append(f"| {k} | {mean_std([x['id_mean'] for x in s])} | "
               f"{mean_std([x['ood_mean'] for x in s])} | {mean_std([x['drop'] for x in s])} |")
  return out


def iterative_table(root: pathlib.Path) -> list[str]:
  rows = []
  for kind in KINDS:
    f = root / f"iter_{kind}" / "iterative_metrics.jsonl"
    if f.exists():
      rows += [(kind, json.loads(line)) for line in f.read_text().splitlines() if line.strip()]
  if not rows:
    return []
  out = ["| annotator | row | annotator reward (mean) | KL to π_0 (est.) | length | "
         "pairs kept | pairs skipped (ties) |", "|---|---|---:|---:|---:|---:|---:|"]
  for kind, r in rows:
    out.append(f"| {kind} | {r['stage']} {r['iteration']} | {r['reward_mean']:+.4f} | "
               f"{r['kl_to_initial']:.3f} | {r['response_length']:.1f} | "
               f"{r.get('num_pairs', '–')} | {r.get('skipped_ties', '–')} |")
  return out


def generate_table(root: pathlib.Path) -> list[str]:
  f = root / "generate" / "generation_eval.json"
  if not f.exists():
    return []
  gen = json.loads(f.read_text())
  out = ["| policy | n | RM score mean |", "|---|---:|---:|"]
  for name, st in gen["policies"].items():
    out.append(f"| {name} | {st['n']} | {st['mean']:+.4f} |")
  return out


def main(argv: list[str]) -> int:
  if len(argv) != 2:
    print(__doc__, file=sys.stderr)
    return 2
  root = pathlib.Path(argv[1])
  for title, lines in (("Explicit vs implicit reward accuracy", eval_tables(root)),
                       ("Iterative DPO", iterative_table(root)),
                       ("Generations scored by the explicit RM", generate_table(root))):
    if lines:
      print(f"### {title}\n")
      print("\n".join(lines) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
