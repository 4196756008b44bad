"""Named evaluation sets (the real preference test sets under `shared/data`), ID/OOD tagged.

Paths are relative to a `shared_data_dir` (no machine paths are hard-coded); by default
it is `$PREFJAX_SHARED_DATA`, else `../shared/data` next to the repository checkout.
Each set names the `prefjax.data.FORMATS` entry that parses it ("hh", "hhh", "pandalm",
"llmbar", "explicit").

Tags follow Lin et al. 2024: models are trained on HH-RLHF-style data, so the four
HH-RLHF test splits are in-distribution ("id"); everything else is out-of-distribution
("ood"): hand-written (HHH), instruction following (PandaLM, LLMBar), chat-model answers
with human labels (FairEval, LLMEval², MT-Bench human) and AI labels (UltraFeedback).

Counts, checked by tests/eval against the files in shared/data (see its README.md):
  `num_records`  records in the file;
  `num_pairs`    pairs that carry a preference (PandaLM: majority of 3 annotators, not a
                 tie; UltraFeedback: score_chosen > score_rejected; HH: chosen != rejected);
  `num_loadable` pairs `prefjax.data` yields from them with `on_bad_record="skip"`: it
                 also drops records with an empty response (PandaLM: 52; HH: 3–5 per
                 file) and identical responses.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Optional

ENV_VAR = "PREFJAX_SHARED_DATA"


@dataclasses.dataclass(frozen=True)
class EvalSetSpec:
  """One named evaluation set.

  Attributes:
    name: registry key, e.g. "pandalm".
    path: file path relative to the shared data dir.
    format: `prefjax.data.FORMATS` key that parses it.
    tag: "id" or "ood".
    num_records: records in the file.
    num_pairs: pairs with a preference label (label ties excluded; HH: chosen != rejected).
    num_loadable: pairs prefjax.data yields (module docstring).
    note: one line for tables.
    drop_score_ties: records carry `metadata.score_chosen/score_rejected` (UltraFeedback)
      and equal scores are ties, to be removed before loading (`runner.pipeline_batches`).
  """
  name: str
  path: str
  format: str
  tag: str
  num_records: int
  num_pairs: int
  num_loadable: int
  note: str = ""
  drop_score_ties: bool = False


def _hh(name: str, sub: str, n: int, pairs: int, loadable: int, note: str) -> EvalSetSpec:
  return EvalSetSpec(name, f"hh-rlhf/{sub}/test.jsonl.gz", "hh", "id", n, pairs, loadable, note)


def _llmbar(name: str, sub: str, n: int, note: str, loadable: Optional[int] = None
            ) -> EvalSetSpec:
  return EvalSetSpec(name, f"llmbar/{sub}/dataset.json", "llmbar", "ood", n, n,
                     n if loadable is None else loadable, note)


EVAL_SETS: dict[str, EvalSetSpec] = {s.name: s for s in (
    _hh("hh_harmless_base", "harmless-base", 2312, 2312, 2308, "HH-RLHF harmless-base test"),
    _hh("hh_helpful_base", "helpful-base", 2354, 2352, 2348, "HH-RLHF helpful-base test"),
    _hh("hh_helpful_online", "helpful-online", 1137, 1135, 1132, "HH-RLHF helpful-online test"),
    _hh("hh_helpful_rejection_sampled", "helpful-rejection-sampled", 2749, 2717, 2717,
        "HH-RLHF helpful-rejection-sampled test"),
    EvalSetSpec("hhh_alignment", "hhh-alignment/hhh_alignment.jsonl", "hhh", "ood",
                221, 221, 221, "BIG-bench HHH alignment (hand-written)"),
    EvalSetSpec("pandalm", "pandalm-testset/testset-v1.json", "pandalm", "ood", 999, 894, 842,
                "PandaLM test, majority label, ties excluded"),
    _llmbar("llmbar_natural", "LLMBar/Natural", 100, "LLMBar Natural"),
    _llmbar("llmbar_adversarial_neighbor", "LLMBar/Adversarial/Neighbor", 134,
            "LLMBar Adversarial Neighbor"),
    _llmbar("llmbar_adversarial_gptinst", "LLMBar/Adversarial/GPTInst", 92,
            "LLMBar Adversarial GPTInst"),
    _llmbar("llmbar_adversarial_gptout", "LLMBar/Adversarial/GPTOut", 47,
            "LLMBar Adversarial GPTOut"),
    _llmbar("llmbar_adversarial_manual", "LLMBar/Adversarial/Manual", 46,
            "LLMBar Adversarial Manual"),
    _llmbar("llmbar_faireval", "Processed/FairEval", 66, "FairEval (human, via LLMBar)"),
    _llmbar("llmbar_llmeval2", "Processed/LLMEval2", 200, "LLMEval² (human, via LLMBar)", 198),
    _llmbar("mtbench_human", "Processed/MT-Bench", 200, "MT-Bench human judgments (via LLMBar)"),
    EvalSetSpec("ultrafeedback_sample", "ultrafeedback-binarized-sample/eval_clean.jsonl",
                "explicit", "ood", 200, 175, 175, "UltraFeedback eval sample (GPT-4 labels)",
                drop_score_ties=True),
)}

ID_SETS = tuple(n for n, s in EVAL_SETS.items() if s.tag == "id")
OOD_SETS = tuple(n for n, s in EVAL_SETS.items() if s.tag == "ood")


def default_shared_data_dir() -> pathlib.Path:
  """`$PREFJAX_SHARED_DATA` if set, else `<repo>/../shared/data`."""
  env = os.environ.get(ENV_VAR)
  if env:
    return pathlib.Path(env)
  repo = pathlib.Path(__file__).resolve().parents[2]
  return repo.parent / "shared" / "data"


def get_spec(name: str) -> EvalSetSpec:
  """The registered set `name`; ValueError listing the known names otherwise."""
  try:
    return EVAL_SETS[name]
  except KeyError:
    raise ValueError(f"unknown eval set {name!r}; known: {sorted(EVAL_SETS)}") from None


def resolve_path(name: str, shared_data_dir: Optional[os.PathLike | str] = None, *,
                 check: bool = True) -> pathlib.Path:
  """Absolute path of set `name` under `shared_data_dir` (default: `default_shared_data_dir()`).

  Raises FileNotFoundError naming the set, the path and the env var when `check` and
  the file is missing.
  """
  base = pathlib.Path(shared_data_dir) if shared_data_dir is not None else default_shared_data_dir()
  path = base / get_spec(name).path
  if check and not path.is_file():
    raise FileNotFoundError(
        f"eval set {name!r}: {path} does not exist (shared data dir {base}; "
        f"set ${ENV_VAR} or pass shared_data_dir)")
  return path


def tags_for(names) -> dict[str, str]:
  """{name: tag} for the registered names among `names` (others are left out)."""
  return {n: EVAL_SETS[n].tag for n in names if n in EVAL_SETS}
