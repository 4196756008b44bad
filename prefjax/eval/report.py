"""Evaluation reports: `eval_results.json`, a Markdown table and a self-contained HTML page.

Input everywhere is `by_kind`: reward kind (e.g. "explicit", "implicit") -> set name ->
metrics dict from `prefjax.eval.metrics.pair_metrics`. One kind gives one table; two
kinds add a side-by-side comparison (explicit RM vs the DPO implicit RM, as in
Lin et al. 2024, Table 2).

`eval_results.json` schema ("prefjax.eval/1"):

  {"schema": "prefjax.eval/1",
   "tags": {set: "id" | "ood"},
   "models": {kind: {"sets": {set: metrics}, "summary": {id_mean, ood_mean, drop, ...}}},
   "comparison": {"kinds": [a, b], "accuracy_delta": {set: acc_b − acc_a}, ...}  # 2 kinds
   "meta": {...}}

Non-finite floats (NaN, e.g. an empty bucket) are written as null, so the file is strict
JSON.
"""
from __future__ import annotations

import html
import json
import math
import os
import pathlib
from typing import Any, Mapping, Optional, Sequence, Union

from prefjax.eval import metrics as metrics_lib

SCHEMA = "prefjax.eval/1"
ByKind = Mapping[str, Mapping[str, Mapping[str, Any]]]

_COLUMNS = ("set", "tag", "n", "accuracy", "95% CI", "mean", "std", "margin", "longer preferred")


def json_safe(x: Any) -> Any:
  """JSON-safe copy: NaN/inf -> None, tuples -> lists, numpy scalars -> Python."""
  if isinstance(x, Mapping):
    return {str(k): json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [json_safe(v) for v in x]
  if hasattr(x, "item") and not isinstance(x, (str, bytes)):
    x = x.item()
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x


def _num(x: Any, digits: int = 3) -> str:
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return "–"
  if isinstance(x, int):
    return str(x)
  return f"{float(x):.{digits}f}"


def _signed(x: Any, digits: int = 3) -> str:
  return "–" if x is None or not math.isfinite(float(x)) else f"{float(x):+.{digits}f}"


def summarize(by_kind: ByKind, tags: Mapping[str, str]) -> dict[str, dict[str, Any]]:
  """{kind: id_ood_summary of its accuracies}."""
  return {kind: metrics_lib.id_ood_summary(sets, tags) for kind, sets in by_kind.items()}


def results_json(by_kind: ByKind, *, tags: Mapping[str, str],
                 meta: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
  """The `eval_results.json` object (module docstring), JSON-safe."""
  summaries = summarize(by_kind, tags)
  out: dict[str, Any] = {
      "schema": SCHEMA,
      "tags": dict(tags),
      "models": {kind: {"sets": dict(sets), "summary": summaries[kind]}
                 for kind, sets in by_kind.items()},
      "meta": dict(meta or {}),
  }
  kinds = list(by_kind)
  if len(kinds) == 2:
    a, b = kinds
    common = [n for n in by_kind[a] if n in by_kind[b]]
    out["comparison"] = {
        "kinds": [a, b],
        "accuracy_delta": {n: by_kind[b][n]["accuracy"] - by_kind[a][n]["accuracy"]
                           for n in common},
        "id_mean_delta": summaries[b]["id_mean"] - summaries[a]["id_mean"],
        "ood_mean_delta": summaries[b]["ood_mean"] - summaries[a]["ood_mean"],
    }
  return json_safe(out)


def _set_row(name: str, m: Mapping[str, Any], tag: Optional[str]) -> list[str]:
  ci = m.get("accuracy_ci")
  ci_s = f"[{_num(ci[0])}, {_num(ci[1])}]" if ci else "–"
  lb = m.get("length_bias") or {}
  return [name, tag or "", _num(int(m["n_pairs"])), _num(m["accuracy"]), ci_s, _num(m["mean"]),
          _num(m["std"]), _num(m["margin_mean"]), _num(lb.get("frac_longer_preferred"))]


def _summary_rows(summary: Mapping[str, Any], width: int) -> list[list[str]]:
  pad = [""] * (width - 4)
  sets = lambda n: f"{n} set" + ("" if n == 1 else "s")  # noqa: E731
  return [
      [f"**ID mean** ({sets(len(summary['id_sets']))})", "id", "", _num(summary["id_mean"])] + pad,
      [f"**OOD mean** ({sets(len(summary['ood_sets']))})", "ood", "",
       _num(summary["ood_mean"])] + pad,
      ["**ID − OOD drop**", "", "", _signed(summary["drop"])] + pad,
  ]


def table_rows(sets: Mapping[str, Mapping[str, Any]], tags: Mapping[str, str]
               ) -> tuple[list[str], list[list[str]]]:
  """(header, rows) of one model's table: one row per set, then ID/OOD means and drop."""
  rows = [_set_row(n, m, tags.get(n)) for n, m in sets.items()]
  rows += _summary_rows(metrics_lib.id_ood_summary(sets, tags), len(_COLUMNS))
  return list(_COLUMNS), rows


def comparison_rows(by_kind: ByKind, tags: Mapping[str, str]
                    ) -> tuple[list[str], list[list[str]]]:
  """(header, rows) comparing two kinds: accuracy, margin and accuracy delta per set."""
  if len(by_kind) != 2:
    raise ValueError(f"a comparison needs exactly 2 reward kinds, got {list(by_kind)}")
  a, b = list(by_kind)
  header = ["set", "tag", "n", f"acc {a}", f"acc {b}", f"Δ ({b} − {a})", f"margin {a}",
            f"margin {b}"]
  rows = []
  for n, ma in by_kind[a].items():
    if n not in by_kind[b]:
      continue
    mb = by_kind[b][n]
    rows.append([n, tags.get(n, ""), _num(int(ma["n_pairs"])), _num(ma["accuracy"]),
                 _num(mb["accuracy"]), _signed(mb["accuracy"] - ma["accuracy"]),
                 _num(ma["margin_mean"]), _num(mb["margin_mean"])])
  sa, sb = (metrics_lib.id_ood_summary(by_kind[k], tags) for k in (a, b))
  for label, key, fmt in (("**ID mean**", "id_mean", _num), ("**OOD mean**", "ood_mean", _num),
                          ("**ID − OOD drop**", "drop", _signed)):
    rows.append([label, "", "", fmt(sa[key]), fmt(sb[key]), _signed(sb[key] - sa[key]), "", ""])
  return header, rows


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  right = {i for i, h in enumerate(header) if i >= 2}
  lines = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---:" if i in right else "---" for i in range(len(header))) + "|"]
  lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
  return "\n".join(lines)


def markdown_report(by_kind: ByKind, *, tags: Mapping[str, str],
                    title: str = "Reward-model evaluation") -> str:
  """Markdown: one table per reward kind, then the comparison when there are two kinds."""
  parts = [f"# {title}", "",
           "Accuracy = P(score(chosen) > score(rejected)) over pairs with a preference label "
           "(data ties excluded; exact score ties count 0.5). ID/OOD means are unweighted over "
           "sets; drop = ID mean − OOD mean. `longer preferred` = how often the longer "
           "response scores higher.", ""]
  for kind, sets in by_kind.items():
    parts += [f"## {kind}", "", _markdown(*table_rows(sets, tags)), ""]
  if len(by_kind) == 2:
    parts += ["## Comparison", "", _markdown(*comparison_rows(by_kind, tags)), ""]
  return "\n".join(parts)


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  def cell(tag: str, text: str) -> str:
    text = html.escape(str(text))
    if text.startswith("**") and text.endswith("**"):
      text = f"<b>{text[2:-2]}</b>"
    elif "**" in text:
      text = text.replace("**", "")
    return f"<{tag}>{text}</{tag}>"
  head = "<tr>" + "".join(cell("th", h) for h in header) + "</tr>"
  body = "\n".join("<tr>" + "".join(cell("td", c) for c in r) + "</tr>" for r in rows)
  return f"<table>\n<thead>{head}</thead>\n<tbody>\n{body}\n</tbody>\n</table>"


_CSS = ("body{font-family:system-ui,sans-serif;margin:2em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}"
        "th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "th:first-child,td:first-child,td:nth-child(2){text-align:left}"
        "thead{background:#f0f0f0}tbody tr:nth-child(even){background:#fafafa}")


def html_report(by_kind: ByKind, *, tags: Mapping[str, str],
                title: str = "Reward-model evaluation") -> str:
  """A self-contained HTML page (inline CSS, no scripts) with the same tables."""
  parts = [f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}"
           f"</title><style>{_CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
  for kind, sets in by_kind.items():
    parts += [f"<h2>{html.escape(kind)}</h2>", _html_table(*table_rows(sets, tags))]
  if len(by_kind) == 2:
    parts += ["<h2>Comparison</h2>", _html_table(*comparison_rows(by_kind, tags))]
  parts.append("</body></html>")
  return "\n".join(parts)


def write_report(outdir: Union[str, os.PathLike], by_kind: ByKind, *,
                 tags: Mapping[str, str], meta: Optional[Mapping[str, Any]] = None,
                 title: str = "Reward-model evaluation",
                 basename: str = "eval_results") -> dict[str, pathlib.Path]:
  """Writes `<basename>.json`, `.md` and `.html` into `outdir` (created).

  Args:
    outdir: output directory.
    by_kind: reward kind -> set name -> metrics (module docstring).
    tags: set name -> "id" / "ood".
    meta: extra JSON-able information stored under "meta".
    title: heading of the Markdown and HTML reports.
    basename: file name stem.

  Returns:
    {"json": path, "markdown": path, "html": path}.
  """
  out = pathlib.Path(outdir)
  out.mkdir(parents=True, exist_ok=True)
  paths = {"json": out / f"{basename}.json", "markdown": out / f"{basename}.md",
           "html": out / f"{basename}.html"}
  paths["json"].write_text(
      json.dumps(results_json(by_kind, tags=tags, meta=meta), indent=2, allow_nan=False) + "\n",
      encoding="utf-8")
  paths["markdown"].write_text(markdown_report(by_kind, tags=tags, title=title) + "\n",
                               encoding="utf-8")
  paths["html"].write_text(html_report(by_kind, tags=tags, title=title) + "\n", encoding="utf-8")
  return paths
