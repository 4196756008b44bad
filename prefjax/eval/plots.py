"""PNG figures for reward-model evaluation (matplotlib, Agg canvas, no pyplot state).

  * chosen vs rejected score histograms per set (the usual RM-report figure: two
    overlapping distributions whose separation is the accuracy);
  * accuracy per set as bars, several reward kinds side by side (explicit vs implicit,
    Lin et al. 2024, Fig. 1), ID/OOD marked, optional bootstrap CIs;
  * accuracy by length bucket (length-bias diagnosis, Singhal et al. 2023);
  * score distributions of generations from several policies (base vs trained).

Figures are built on `matplotlib.figure.Figure` and saved through its Agg canvas, so
importing this module never changes the user's pyplot backend.
"""
from __future__ import annotations

import math
import os
import pathlib
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

PathLike = Union[str, os.PathLike]
_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf")


def _new_figure(width: float, height: float) -> Figure:
  fig = Figure(figsize=(width, height), dpi=100)
  FigureCanvasAgg(fig)
  return fig


def _save(fig: Figure, path: PathLike, *, suptitle: Optional[str] = None) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  if suptitle:  # set before tight_layout, which then leaves room for it
    fig.suptitle(suptitle, fontsize=11)
  fig.tight_layout()
  fig.savefig(path, format="png")
  return path


def _style(j: int, n: int) -> dict[str, Any]:
  """Distinct line colour / style / marker for series j of n (tab20 beyond 7 series)."""
  if n <= len(_COLORS):
    return {"color": _COLORS[j], "marker": "o"}
  import matplotlib  # pylint: disable=import-outside-toplevel
  cmap = matplotlib.colormaps["tab20"]
  return {"color": cmap(j % 20), "marker": "osD^v"[j % 5], "linestyle": ("-", "--", ":")[j // 20 % 3]}


def _grid(n: int, ncols: int) -> tuple[int, int]:
  ncols = max(1, min(ncols, n))
  return int(math.ceil(n / ncols)), ncols


def plot_score_histograms(scores: Mapping[str, tuple[Any, Any]], path: PathLike, *,
                          bins: int = 40, ncols: int = 3,
                          title: Optional[str] = None) -> pathlib.Path:
  """Histograms of chosen vs rejected scores, one panel per set.

  Args:
    scores: set name -> (chosen [N], rejected [N]) scores of its valid pairs.
    path: PNG file to write.
    bins: histogram bins (shared by both sides of a panel).
    ncols: panels per row.
    title: figure title.

  Returns:
    the written path.
  """
  if not scores:
    raise ValueError("no sets to plot")
  nrows, ncols = _grid(len(scores), ncols)
  fig = _new_figure(4.2 * ncols, 3.0 * nrows + 0.4)
  for i, (name, (chosen, rejected)) in enumerate(scores.items()):
    ax = fig.add_subplot(nrows, ncols, i + 1)
    c, r = np.asarray(chosen, np.float64), np.asarray(rejected, np.float64)
    both = np.concatenate([c, r])
    if both.size:
      edges = np.histogram_bin_edges(both, bins=bins)
      for vals, side, color in ((c, "chosen", _COLORS[0]), (r, "rejected", _COLORS[1])):
        ax.hist(vals, bins=edges, histtype="stepfilled", alpha=0.5, color=color,
                label=f"{side} (μ={vals.mean():.2f})")
      acc = float(np.mean(np.where(c > r, 1.0, np.where(c < r, 0.0, 0.5))))
      ax.set_title(f"{name}  (acc {acc:.3f}, n={c.size})", fontsize=9)
      ax.legend(fontsize=7)
    else:
      ax.set_title(f"{name} (no pairs)", fontsize=9)
    ax.set_xlabel("score", fontsize=8)
    ax.set_ylabel("count", fontsize=8)
    ax.tick_params(labelsize=7)
  return _save(fig, path, suptitle=title)


def plot_accuracy_bars(accuracies: Mapping[str, Mapping[str, float]], path: PathLike, *,
                       ci: Optional[Mapping[str, Mapping[str, Sequence[float]]]] = None,
                       tags: Optional[Mapping[str, str]] = None, chance: float = 0.5,
                       title: str = "Pairwise accuracy per set") -> pathlib.Path:
  """Grouped bars: accuracy per set, one bar per reward kind.

  Args:
    accuracies: kind -> set name -> accuracy. Sets are the union, in first-seen order.
    path: PNG file to write.
    ci: optional kind -> set -> (lo, hi) interval, drawn as error bars.
    tags: optional set -> "id" / "ood"; OOD set labels are drawn in italics and the
      ID/OOD means of each kind appended as two extra groups.
    chance: a dashed reference line (0.5 = random).
    title: axes title.
  """
  kinds = list(accuracies)
  sets: list[str] = []
  for k in kinds:
    sets += [s for s in accuracies[k] if s not in sets]
  values = {k: [accuracies[k].get(s, np.nan) for s in sets] for k in kinds}
  labels = list(sets)
  if tags:
    for k in kinds:
      for tag in ("id", "ood"):
        vals = [accuracies[k][s] for s in accuracies[k] if tags.get(s) == tag]
        values[k].append(float(np.mean(vals)) if vals else np.nan)
    labels += ["ID mean", "OOD mean"]
  x = np.arange(len(labels))
  width = 0.8 / max(1, len(kinds))
  fig = _new_figure(max(6.0, 0.55 * len(labels) * max(1, len(kinds)) + 2.0), 4.2)
  ax = fig.add_subplot(1, 1, 1)
  for j, k in enumerate(kinds):
    yerr = None
    if ci and k in ci:
      lo_hi = [ci[k].get(s) for s in sets] + [None] * (len(labels) - len(sets))
      v = values[k]
      yerr = np.array([[v[i] - b[0], b[1] - v[i]] if b else [np.nan, np.nan]
                       for i, b in enumerate(lo_hi)]).T
    ax.bar(x + (j - (len(kinds) - 1) / 2) * width, values[k], width, label=k,
           color=_COLORS[j % len(_COLORS)], yerr=yerr, capsize=2)
  ax.axhline(chance, color="gray", linestyle="--", linewidth=1)
  ax.set_xticks(x)
  ax.set_xticklabels(labels, rotation=40, ha="right", fontsize=8)
  if tags:
    for tick, lab in zip(ax.get_xticklabels(), labels):
      if tags.get(lab) == "ood":
        tick.set_fontstyle("italic")
  ax.set_ylim(0.0, 1.0)
  ax.set_ylabel("accuracy")
  ax.set_title(title + ("  (OOD sets in italics)" if tags else ""), fontsize=10)
  ax.legend(fontsize=8)
  return _save(fig, path)


def plot_length_buckets(length_bias: Mapping[str, Mapping[str, Any]], path: PathLike, *,
                        title: str = "Accuracy by length bucket") -> pathlib.Path:
  """Accuracy per length bucket, two panels: by chosen−rejected length difference and by
  total length, one line per series.

  Args:
    length_bias: series label (e.g. set name, or "set / kind") -> the `length_bias` dict
      of `metrics.pair_metrics` (`by_length_diff`, `by_total_length` bucket lists).
    path: PNG file to write.
    title: figure title.
  """
  many = len(length_bias) > 4
  fig = _new_figure(13.0 if many else 11.0, 4.0)
  panels = (("by_length_diff", "len(chosen) − len(rejected) [tokens]"),
            ("by_total_length", "len(chosen) + len(rejected) [tokens]"))
  for p, (key, xlabel) in enumerate(panels):
    ax = fig.add_subplot(1, 2, p + 1)
    label_sets = {tuple(b["label"] for b in lb[key]) for lb in length_bias.values()}
    for j, (label, lb) in enumerate(length_bias.items()):
      acc = [b["accuracy"] if b["accuracy"] is not None else np.nan for b in lb[key]]
      ax.plot(range(len(acc)), acc, label=label, markersize=4,
              **_style(j, len(length_bias)))
    if len(label_sets) == 1:  # same buckets for every series: name them
      (labels,) = label_sets
      if len(length_bias) == 1:
        (lb,) = length_bias.values()
        labels = tuple(f"{b['label']}\n(n={b['n']})" for b in lb[key])
      ax.set_xticks(range(len(labels)))
      ax.set_xticklabels(labels, fontsize=7)
    else:  # per-set quantile buckets: shortest ... longest
      width = max(len(t) for t in label_sets)
      ax.set_xticks(range(width))
      ax.set_xticklabels([f"Q{i + 1}" for i in range(width)], fontsize=7)
      xlabel += ", per-set quantile bucket"
    ax.axhline(0.5, color="gray", linestyle="--", linewidth=1)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel("accuracy", fontsize=8)
    if p == 1:  # one legend, outside the axes
      ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
  return _save(fig, path, suptitle=title)


def plot_generation_scores(scores: Mapping[str, Any], path: PathLike, *, bins: int = 40,
                           title: str = "Reward of generations") -> pathlib.Path:
  """Overlaid score distributions of generations from several policies (base vs trained).

  Args:
    scores: policy name -> [M] reward-model scores of its generations.
    path: PNG file to write.
    bins: shared histogram bins.
    title: axes title.
  """
  arrays = {k: np.asarray(v, np.float64).ravel() for k, v in scores.items()}
  allv = np.concatenate([a for a in arrays.values()]) if arrays else np.zeros(0)
  if allv.size == 0:
    raise ValueError("no generation scores to plot")
  edges = np.histogram_bin_edges(allv, bins=bins)
  fig = _new_figure(6.5, 4.0)
  ax = fig.add_subplot(1, 1, 1)
  for j, (name, a) in enumerate(arrays.items()):
    color = _COLORS[j % len(_COLORS)]
    ax.hist(a, bins=edges, histtype="stepfilled", alpha=0.45, color=color,
            label=f"{name} (μ={a.mean():.2f}, σ={a.std():.2f}, n={a.size})")
    ax.axvline(a.mean(), color=color, linestyle="--", linewidth=1)
  ax.set_xlabel("reward score")
  ax.set_ylabel("count")
  ax.set_title(title, fontsize=10)
  ax.legend(fontsize=8)
  return _save(fig, path)


def write_eval_plots(outdir: PathLike, results: Mapping[str, Mapping[str, Any]]
                     ) -> dict[str, pathlib.Path]:
  """All figures of an evaluation run (what `runner.evaluate_and_report` writes).

  Args:
    outdir: directory for the PNGs.
    results: kind -> set name -> `runner.SetResult` (needs `.scores`, `.metrics`, `.tag`).

  Returns:
    {label: path}: `hist_<kind>` (score_hist_<kind>.png), `accuracy` (accuracy.png),
    `length_<kind>` (length_buckets_<kind>.png, when lengths are known).
  """
  out = pathlib.Path(outdir)
  files: dict[str, pathlib.Path] = {}
  tags: dict[str, str] = {}
  for kind, sets in results.items():
    tags.update({n: r.tag for n, r in sets.items() if r.tag})
    files[f"hist_{kind}"] = plot_score_histograms(
        {n: (r.scores.chosen, r.scores.rejected) for n, r in sets.items()},
        out / f"score_hist_{kind}.png", title=f"{kind}: chosen vs rejected scores")
    lb = {n: r.metrics["length_bias"] for n, r in sets.items() if "length_bias" in r.metrics}
    if lb:
      files[f"length_{kind}"] = plot_length_buckets(
          lb, out / f"length_buckets_{kind}.png", title=f"{kind}: accuracy by length bucket")
  files["accuracy"] = plot_accuracy_bars(
      {k: {n: r.metrics["accuracy"] for n, r in s.items()} for k, s in results.items()},
      out / "accuracy.png",
      ci={k: {n: r.metrics["accuracy_ci"] for n, r in s.items() if r.metrics["accuracy_ci"]}
          for k, s in results.items()},
      tags=tags or None)
  return files
