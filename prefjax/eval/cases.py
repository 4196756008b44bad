"""Generation-based evaluation: score summaries and a case-study table of two policies.

Input records are JSONL lines `{"prompt": str, "response": str, "score": float}` (extra
keys are ignored), one file per policy, e.g. the `generate` task's outputs scored by a
reward model. Prompts are matched by exact text. When a policy has several generations
for one prompt, its score for that prompt is their mean and the first response is shown.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Iterable, Mapping, Sequence, Union

import numpy as np

Record = Mapping[str, Any]


def load_generations(path: Union[str, os.PathLike]) -> list[dict[str, Any]]:
  """Reads a JSONL file of generations; errors name the file, line and missing field."""
  out = []
  path = pathlib.Path(path)
  with path.open(encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
      for field in ("prompt", "response", "score"):
        if field not in rec:
          raise ValueError(f"{path}:{lineno}: missing field {field!r}")
      out.append(rec)
  return out


def by_prompt(records: Iterable[Record]) -> dict[str, tuple[float, str, int]]:
  """{prompt: (mean score, first response, number of generations)}, in first-seen order."""
  scores: dict[str, list[float]] = {}
  first: dict[str, str] = {}
  for rec in records:
    p = str(rec["prompt"])
    scores.setdefault(p, []).append(float(rec["score"]))
    first.setdefault(p, str(rec["response"]))
  return {p: (float(np.mean(s)), first[p], len(s)) for p, s in scores.items()}


def generation_summary(records_by_policy: Mapping[str, Iterable[Record]]) -> dict[str, Any]:
  """Per-policy score mean/std/n, and pairwise win rates on shared prompts.

  Returns:
    {"policies": {name: {"mean", "std", "n"}}, "win_rate": {"b_vs_a": P(score_b > score_a)
    over shared prompts, ties 0.5}} (win rates for every ordered pair of policies).
  """
  records_by_policy = {k: list(v) for k, v in records_by_policy.items()}  # iterated twice
  grouped = {k: by_prompt(v) for k, v in records_by_policy.items()}
  policies = {}
  for name, recs in records_by_policy.items():
    s = np.array([float(r["score"]) for r in recs], np.float64)
    policies[name] = {"mean": float(s.mean()) if s.size else float("nan"),
                      "std": float(s.std()) if s.size else float("nan"), "n": int(s.size)}
  wins = {}
  names = list(grouped)
  for a in names:
    for b in names:
      if a == b:
        continue
      shared = [p for p in grouped[b] if p in grouped[a]]
      if shared:
        sb = np.array([grouped[b][p][0] for p in shared])
        sa = np.array([grouped[a][p][0] for p in shared])
        wins[f"{b}_vs_{a}"] = float(np.mean(np.where(sb > sa, 1.0, np.where(sb < sa, 0.0, 0.5))))
  return {"policies": policies, "win_rate": wins}


def _cell(text: str, max_chars: int) -> str:
  text = " ".join(text.split("\n\n")).strip()
  if len(text) > max_chars:
    text = text[:max_chars - 1].rstrip() + "…"
  text = text.replace("\r\n", "\n").replace("\r", "\n")  # a bare CR would end the table row
  return text.replace("|", "\\|").replace("\n", "<br>")


def case_study_rows(records_a: Iterable[Record], records_b: Iterable[Record], *,
                    top_k: int = 10) -> list[dict[str, Any]]:
  """Shared prompts sorted by |score_b − score_a|, largest first (ties: data order).

  Returns:
    up to `top_k` dicts: prompt, response_a, score_a, response_b, score_b, delta (b − a).
  """
  ga, gb = by_prompt(records_a), by_prompt(records_b)
  rows = [{"prompt": p, "response_a": ga[p][1], "score_a": ga[p][0],
           "response_b": gb[p][1], "score_b": gb[p][0], "delta": gb[p][0] - ga[p][0]}
          for p in ga if p in gb]
  rows.sort(key=lambda r: -abs(r["delta"]))  # stable: equal |Δ| keep data order
  return rows[:top_k]


def case_study_markdown(records_a: Iterable[Record], records_b: Iterable[Record], *,
                        names: Sequence[str] = ("base", "trained"), top_k: int = 10,
                        max_chars: int = 300) -> str:
  """Markdown table of the prompts where two policies' scores differ most.

  Args:
    records_a, records_b: generations of policy A and B (`load_generations`).
    names: display names of A and B.
    top_k: number of rows.
    max_chars: truncation of prompt/response cells (newlines become <br>).
  """
  a, b = names
  rows = case_study_rows(records_a, records_b, top_k=top_k)
  head = (f"| # | prompt | {a} response | {a} score | {b} response | {b} score | Δ ({b} − {a}) |\n"
          "|---:|---|---|---:|---|---:|---:|")
  lines = [f"### Largest score differences: {b} vs {a} (top {len(rows)})", "", head]
  for i, r in enumerate(rows, 1):
    lines.append(f"| {i} | {_cell(r['prompt'], max_chars)} | {_cell(r['response_a'], max_chars)} "
                 f"| {r['score_a']:.3f} | {_cell(r['response_b'], max_chars)} | {r['score_b']:.3f} "
                 f"| {r['delta']:+.3f} |")
  return "\n".join(lines) + "\n"


def write_generation_report(outdir: Union[str, os.PathLike],
                            records_by_policy: Mapping[str, Sequence[Record]], *,
                            top_k: int = 10, max_chars: int = 300, plot: bool = True,
                            basename: str = "generation_eval") -> dict[str, pathlib.Path]:
  """For the `generate` task: summary JSON, case-study Markdown and a score histogram.

  Args:
    outdir: output directory (created).
    records_by_policy: policy name -> its scored generations (`load_generations`), e.g.
      {"base": ..., "dpo": ...}. The case study compares the first policy with each other.
    top_k, max_chars: of the case-study tables.
    plot: also write `<basename>_scores.png` (`plots.plot_generation_scores`).
    basename: file name stem.

  Returns:
    {"json": path, "markdown": path[, "plot": path]}.
  """
  out = pathlib.Path(outdir)
  out.mkdir(parents=True, exist_ok=True)
  names = list(records_by_policy)
  summary = generation_summary(records_by_policy)
  paths = {"json": out / f"{basename}.json", "markdown": out / f"{basename}.md"}
  from prefjax.eval.report import json_safe  # pylint: disable=import-outside-toplevel
  paths["json"].write_text(json.dumps(json_safe(summary), indent=2, allow_nan=False) + "\n",
                           encoding="utf-8")
  lines = ["# Generation scores", "", "| policy | n | mean | std |", "|---|---:|---:|---:|"]
  for name, st in summary["policies"].items():
    lines.append(f"| {name} | {st['n']} | {st['mean']:.3f} | {st['std']:.3f} |")
  lines.append("")
  for other in names[1:]:
    win = summary["win_rate"].get(f"{other}_vs_{names[0]}")
    if win is not None:
      lines += [f"Win rate of {other} over {names[0]} (shared prompts, ties 0.5): {win:.3f}", ""]
    lines.append(case_study_markdown(records_by_policy[names[0]], records_by_policy[other],
                                     names=(names[0], other), top_k=top_k, max_chars=max_chars))
  paths["markdown"].write_text("\n".join(lines), encoding="utf-8")
  if plot:
    from prefjax.eval import plots  # pylint: disable=import-outside-toplevel
    paths["plot"] = plots.plot_generation_scores(
        {k: [float(r["score"]) for r in v] for k, v in records_by_policy.items()},
        out / f"{basename}_scores.png")
  return paths
