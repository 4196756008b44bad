r"""The `eval_reward` and `eval_implicit_reward` tasks: load the model(s), score eval sets.

Lin et al. 2024 ("On the Limited Generalization Capability of the Implicit Reward Model
Induced by Direct Preference Optimization") compare an explicit Bradley–Terry reward model
with the implicit reward r(x, y) = β·log π_θ(y|x)/π_ref(y|x) of a DPO policy trained on the
same data: similar in-distribution (ID) accuracy, lower out-of-distribution (OOD) accuracy.
These two tasks produce exactly that comparison:

  eval_reward           an explicit RM (`config.model.init`: a prefjax reward workdir or an
                        HF `*ForSequenceClassification` dir) on `config.eval.sets`
  eval_implicit_reward  a DPO-family policy (`config.model.init`) and its reference
                        (`config.reference.init`, else read from the policy's workdir), its
                        implicit reward under `config.eval.method` (SimPO / ORPO / CPO use
                        their own definitions, `prefjax.eval.implicit`); with
                        `config.eval.reward_model` also the explicit RM side by side

Both write `eval_results.{json,md,html}`, `eval_scores.npz` and PNG plots into the workdir
(`prefjax.eval.runner.evaluate_and_report`): accuracy (score ties excluded by default,
`config.eval.ties`), reward mean/std, margin, accuracy by length bucket, the ID/OOD means
and the ID−OOD drop.

`config.eval.sets` names the sets: registered names (`prefjax.eval.EVAL_SETS`), the groups
"id" / "ood" / "all", a comma-separated string of those, and/or `name=path[|opt...]`
entries (opts: `id` / `ood` tag, `train` / `eval` side of the trainer's hash split by
`data.split_fraction`, `format=NAME`); or a dict name -> path / {"path", "format", "tag",
"split"} / None (registered). Local sets default to format "auto", tag "id", no split; e.g.
`held_out=<train file>|eval` is the 20% a model trained with split_fraction=0.8 never saw.

  python -m prefjax.main --config=configs/eval_reward.py --workdir=/tmp/eval_rm \
      --config.model.init=/tmp/rm_workdir
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import ml_collections

from prefjax.eval import metrics as metrics_lib
from prefjax.eval import registry
from prefjax.eval import runner
from prefjax.eval import scoring
from prefjax.train import builders
from prefjax.train.validation import ConfigError

RANDOM_INIT = "<random init>"
_GROUPS = {"id": registry.ID_SETS, "ood": registry.OOD_SETS,
           "all": registry.ID_SETS + registry.OOD_SETS}


# --------------------------------------------------------------------------- models


def saved_config(path: Optional[str]) -> Optional[dict[str, Any]]:
  """The `config.json` a prefjax training run wrote into its workdir (None otherwise)."""
  if not path or builders.init_kind(path) != "workdir":
    return None
  return builders.saved_run_config(path)


RUNTIME_KEYS = builders.RUNTIME_KEYS
ARCH_KEYS = tuple(k for k in builders.MODEL_OVERRIDES
                  if k not in RUNTIME_KEYS + ("num_reward_heads",))


def arch_keys(path: Optional[str]) -> dict[str, Any]:
  """Architecture `model.*` keys (preset aside) of a checkpoint: an HF dir's config.json,
  or a workdir's saved keys, completed from the checkpoint it was initialised from (a run
  started from an HF dir saved the recipe's keys, not the HF architecture). {} otherwise."""
  kind = builders.init_kind(path) if path else "none"
  if kind == "hf":
    from prefjax import models  # pylint: disable=import-outside-toplevel
    hf = json.loads((pathlib.Path(path) / "config.json").read_text(encoding="utf-8"))
    cfg = models.config_from_hf(hf)
    return {k: getattr(cfg, k) for k in ARCH_KEYS if hasattr(cfg, k)}
  saved = saved_config(path)
  if saved is None:
    return {}
  model = saved.get("model") or {}
  out = {k: model.get(k) for k in ARCH_KEYS if model.get(k) is not None}
  parent = model.get("init")
  if parent and parent != path and os.path.exists(parent):
    out.update(arch_keys(parent))
  return out


def model_section(path: Optional[str], current: Any) -> Any:
  """Model keys to load `path` with: a workdir's saved `model.*` (its architecture,
  `arch_keys`), with the runtime keys (dtype, remat, ...) of `current`; `current` itself
  for other checkpoints (HF / Flax dirs carry their own architecture)."""
  saved = saved_config(path)
  if saved is None or "model" not in saved:
    return current
  model = ml_collections.ConfigDict(saved["model"])
  with model.ignore_type():
    model.update(arch_keys(path))
    for k in RUNTIME_KEYS:
      if current.get(k) is not None:
        model[k] = current.get(k)
  return model


def load_model(path: str, current_model: Any, *, task: str, mesh: Any, rules: Any
               ) -> tuple[Any, Any]:
  """(ModelConfig, params sharded on `mesh`) of a workdir / HF dir / Flax checkpoint."""
  if not path:
    raise ConfigError(f"no checkpoint given for the {task} model (set config.model.init)")
  if builders.init_kind(path) == "workdir":
    src = builders.source_task(path, task)
    if task == "reward" and src != "reward":
      raise ConfigError(f"{path} was trained for task {src!r}, not a reward model")
  model = model_section(path, current_model)
  return builders.load_pretrained(path, model, task=task, mesh=mesh, rules=rules)


def load_reward_model(path: str, current_model: Any, *, mesh: Any, rules: Any
                      ) -> tuple[Any, Any]:
  """An explicit RM; an HF language model (no reward head) is an error, not a random head."""
  kind = builders.init_kind(path)
  if kind == "hf":
    hf = json.loads((pathlib.Path(path) / "config.json").read_text(encoding="utf-8"))
    archs = hf.get("architectures") or []
    if not any(str(a).endswith("ForSequenceClassification") for a in archs):
      raise ConfigError(f"{path} is not a reward model (architectures {archs}; expected "
                       "*ForSequenceClassification)")
  cfg, params = load_model(path, current_model, task="reward", mesh=mesh, rules=rules)
  return cfg, params


def reference_path(policy_path: str, explicit: Optional[str]) -> str:
  """The reference of a DPO-family policy: `explicit`, else what its training run used
  (`reference.init`, else its `model.init`, else its random init: `RANDOM_INIT`)."""
  if explicit:
    return explicit
  saved = saved_config(policy_path)
  if saved is None:
    raise ConfigError(f"cannot tell the reference model of {policy_path}: set "
                     "config.reference.init")
  ref = (saved.get("reference") or {}).get("init") or (saved.get("model") or {}).get("init")
  return ref or RANDOM_INIT


def load_reference(policy_path: str, explicit: Optional[str], current_model: Any, *,
                   mesh: Any, rules: Any) -> tuple[str, Any, Any]:
  """(path, cfg, params) of the reference; a random-init reference is rebuilt from the
  policy run's saved seed and architecture (the trainer's initial policy)."""
  path = reference_path(policy_path, explicit)
  if path != RANDOM_INIT:
    cfg, params = load_model(path, current_model, task="preference", mesh=mesh, rules=rules)
    return path, cfg, params
  saved = saved_config(policy_path) or {}
  model = model_section(policy_path, current_model)
  cfg = builders.model_config(model, task="preference")
  seed_cfg = ml_collections.ConfigDict({"seed": int(saved.get("seed", 0))})
  return path, cfg, builders.init_params(seed_cfg, cfg, mesh, rules)


def implicit_method(policy_path: str, method: Optional[str], beta: Optional[float]
                    ) -> tuple[str, float]:
  """(method, β): the given ones, else the policy run's `loss.name` / `loss.beta`."""
  loss = (saved_config(policy_path) or {}).get("loss") or {}
  method = method or loss.get("name") or "dpo"
  if beta is None:
    beta = loss.get("beta")
  return str(method), float(0.1 if beta is None else beta)


def implicit_scorer(policy_path: str, ref_path: Optional[str], current_model: Any, *,
                    method: Optional[str], beta: Optional[float], mesh: Any, rules: Any,
                    chunk_size: int = 128, kernels: Any = None
                    ) -> tuple[Any, dict[str, Any], Any, Any]:
  """(score_pairs_fn, info, policy cfg, policy params) of a policy's implicit reward
  (`kernels`: `models.Kernels` of its forward passes; None: the default backend's)."""
  from prefjax.eval import implicit as implicit_lib  # pylint: disable=import-outside-toplevel
  method, beta = implicit_method(policy_path, method, beta)
  if method not in implicit_lib.METHOD_KIND:
    raise ConfigError(f"no implicit reward defined for {method!r}; set config.eval.method "
                     f"to one of {sorted(implicit_lib.METHOD_KIND)}")
  cfg, params = load_model(policy_path, current_model, task="preference", mesh=mesh,
                           rules=rules)
  info: dict[str, Any] = {"policy": policy_path, "method": method, "beta": beta}
  ref_params = None
  if implicit_lib.METHOD_KIND[method] == "ref":
    info["reference"], _, ref_params = load_reference(policy_path, ref_path, current_model,
                                                      mesh=mesh, rules=rules)
  fn = scoring.implicit_score_fn(cfg, params, ref_params, method=method, beta=beta,
                                 chunk_size=chunk_size, kernels=kernels)
  return fn, info, cfg, params


# --------------------------------------------------------------------------- eval sets


def parse_sets(sets: Any) -> dict[str, Optional[dict[str, Any]]]:
  """`config.eval.sets` -> {name: None (registered) | {"path", "format", "tag"}}."""
  if sets is None:
    sets = "all"
  if isinstance(sets, str):
    sets = [s.strip() for s in sets.split(",") if s.strip()]
  out: dict[str, Optional[dict[str, Any]]] = {}
  if isinstance(sets, Mapping) or hasattr(sets, "items"):
    for name, spec in dict(sets).items():
      if spec is None:
        registry.get_spec(name)
        out[name] = None
      elif isinstance(spec, str):
        out[name] = {"path": spec}
      else:
        out[name] = dict(spec)
    return {n: _local_defaults(s) for n, s in out.items()}
  for entry in sets:
    if entry in _GROUPS:
      out.update({n: None for n in _GROUPS[entry]})
    elif "=" in entry:
      name, rest = entry.split("=", 1)
      out[name.strip()] = _entry_spec(rest)
    else:
      registry.get_spec(entry)
      out[entry] = None
  return {n: _local_defaults(s) for n, s in out.items()}


def _entry_spec(text: str) -> dict[str, Any]:
  """`path[|opt...]` -> spec; opts: id | ood (tag), train | eval (side of the hash split by
  `data.split_fraction`, as the trainer splits), format=NAME."""
  path, *opts = [p.strip() for p in text.split("|")]
  spec: dict[str, Any] = {"path": path}
  for o in opts:
    if o in ("id", "ood"):
      spec["tag"] = o
    elif o in ("train", "eval"):
      spec["split"] = o
    elif o.startswith("format="):
      spec["format"] = o.split("=", 1)[1]
    else:
      raise ConfigError(f"unknown eval set option {o!r} in {text!r}; expected id, ood, train, "
                       "eval or format=NAME")
  return spec


def _local_defaults(spec: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
  if spec is None:
    return None
  if "path" not in spec:
    raise ConfigError(f"a local eval set needs a 'path', got {spec}")
  tag = spec.get("tag") or "id"
  if tag not in ("id", "ood"):
    raise ConfigError(f"eval set tag must be 'id' or 'ood', got {tag!r}")
  split = spec.get("split") or None
  if split not in (None, "train", "eval"):
    raise ConfigError(f"eval set split must be 'train' or 'eval', got {split!r}")
  return {"path": str(spec["path"]), "format": spec.get("format") or "auto", "tag": tag,
          "split": split}


class _WithEarlierDrops:
  """Batches of a `split_copy`, whose `dropped` counts also what the copy left out (records
  that failed validation, identical pairs), so `data_dropped` covers the original file."""

  def __init__(self, batches: Any, earlier: Mapping[str, int]):
    self._batches, self._earlier = batches, dict(earlier)

  def __iter__(self):
    return iter(self._batches)

  def __len__(self) -> int:
    return len(self._batches)

  @property
  def dropped_before(self) -> dict[str, int]:
    """What the copy left out (also counted in `dropped`)."""
    return dict(self._earlier)

  @property
  def dropped(self) -> dict[str, int]:
    out = dict(self._earlier)
    for reason, n in dict(getattr(self._batches, "dropped", {}) or {}).items():
      out[reason] = out.get(reason, 0) + n
    return out


def split_copy(name: str, spec: Mapping[str, Any], data_config: Any, out_dir: pathlib.Path
               ) -> tuple[pathlib.Path, dict[str, int]]:
  """JSONL copy of one side (`spec["split"]`) of the trainer's hash split of a file, e.g.
  the held-out 20% of the file a model was trained on (its in-distribution test set).

  Returns:
    (path of the copy, drop counts by reason of the records not copied: invalid ones, from the
    whole file, and identical pairs on that side).
  """
  from prefjax.data import config as data_config_lib  # pylint: disable=import-outside-toplevel
  from prefjax.data import index as index_lib  # pylint: disable=import-outside-toplevel
  fraction = data_config_lib.get(data_config, "split_fraction")
  if fraction is None or float(fraction) >= 1.0:
    raise ConfigError(f"eval set {name!r} asks for the {spec['split']!r} side of the split but "
                     "config.data.split_fraction is not < 1")
  idx = index_lib.build_index(spec["path"], fmt=spec["format"], kind="pairs", policy="skip",
                              part=spec["split"], fraction=float(fraction))
  out_dir.mkdir(parents=True, exist_ok=True)
  out = out_dir / f"{name}.{spec['split']}.jsonl"
  with open(out, "w", encoding="utf-8") as f:
    for i in dict.fromkeys(int(i) for i in idx.items[:, 0]):
      f.write(json.dumps(idx.source[i]) + "\n")
  return out, dict(idx.stats.counts)


def eval_sources(data_config: Any, sets: Mapping[str, Optional[dict[str, Any]]], *,
                 workdir: str, shared_data_dir: Optional[str] = None
                 ) -> tuple[dict[str, Any], dict[str, str]]:
  """(lazy batch sources, ID/OOD tags) for `runner.evaluate_and_report`.

  Registered sets go through `runner.registry_sources` (their format, tie handling);
  local ones through the same `runner.pipeline_batches` with their own spec.
  """
  make = runner.pipeline_batches(data_config, None, process_index=jax.process_index(),
                                 process_count=jax.process_count(),
                                 cache_dir=pathlib.Path(workdir) / "eval_cache")
  registered = [n for n, s in sets.items() if s is None]
  reg = runner.registry_sources(registered, make, shared_data_dir=shared_data_dir)
  sources, tags = {}, {}
  for name, spec in sets.items():
    if spec is None:
      sources[name], tags[name] = reg[name], registry.EVAL_SETS[name].tag
      continue
    path = pathlib.Path(spec["path"])
    if not path.is_file():
      raise FileNotFoundError(f"eval set {name!r}: {path} does not exist")
    earlier: dict[str, int] = {}
    if spec.get("split"):
      path, earlier = split_copy(name, spec, data_config, pathlib.Path(workdir) / "eval_cache")
    local = registry.EvalSetSpec(name, str(path), spec["format"], spec["tag"], 0, 0, 0)
    sources[name] = (lambda bs, local=local, path=path, earlier=earlier:
                     _WithEarlierDrops(make(local, path, bs), earlier))
    tags[name] = spec["tag"]
  return sources, tags


def _eval_options(config: Any) -> dict[str, Any]:
  e = config.eval
  bs = int(e.get("batch_size") or 0) or int(config.data.get("eval_batch_size") or 0) or int(
      config.data.batch_size)
  return {"batch_size": bs, "ties": e.get("ties") or "exclude",
          "bootstrap": int(e.get("bootstrap", 1000)), "seed": int(config.get("seed", 0)),
          "plots": bool(e.get("plots", True)), "progress": bool(config.log.get("progress", True)),
          "max_batches": int(e.get("num_batches") or 0) or None}


def _evaluate(config: Any, workdir: str, score_fns: Mapping[str, Any],
              meta: dict[str, Any]) -> dict[str, Any]:
  os.makedirs(workdir, exist_ok=True)
  sets = parse_sets(config.eval.get("sets"))
  sources, tags = eval_sources(config.data, sets, workdir=workdir,
                               shared_data_dir=config.eval.get("shared_data_dir"))
  opts = _eval_options(config)
  meta = dict(meta, ties=opts["ties"], batch_size=opts["batch_size"],
              num_batches=opts["max_batches"] or 0)
  out = runner.evaluate_and_report(score_fns, sources, workdir=workdir, tags=tags, meta=meta,
                                   **opts)
  acc = {kind: {n: r.metrics["accuracy"] for n, r in res.items()}
         for kind, res in out["results"].items()}
  summary = {kind: {k: v for k, v in metrics_lib.id_ood_summary(
      {n: r.metrics for n, r in res.items()}, tags).items() if k in ("id_mean", "ood_mean", "drop")}
             for kind, res in out["results"].items()}
  logging.info("eval accuracies: %s; report: %s", acc, out["files"].get("markdown"))
  return {"accuracy": acc, "summary": summary,
          "files": {k: str(v) for k, v in out["files"].items()}}


def _mesh(config: Any):
  builders.maybe_initialize_distributed(config.get("distributed"))
  return builders.make_mesh(config)


def run_eval_reward(config: Any, workdir: str) -> dict[str, Any]:
  """`task="eval_reward"`: an explicit reward model on `config.eval.sets`.

  Returns:
    {"accuracy": {"explicit": {set: acc}}, "summary": {"explicit": {id_mean, ood_mean,
    drop}}, "files": {label: path}}; `workdir/eval_results.json` holds all the metrics.
  """
  mesh, rules = _mesh(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
    cfg, params = load_reward_model(config.model.init, config.model, mesh=mesh, rules=rules)
    head = int(config.eval.get("reward_head", 0) or 0)
    kernels = builders.kernels_for_mesh(config, mesh)
    fns = {"explicit": scoring.reward_score_fn(cfg, params, head=head, kernels=kernels)}
    return _evaluate(config, workdir, fns, {"task": "eval_reward",
                                            "reward_model": config.model.init, "head": head})


def run_eval_implicit_reward(config: Any, workdir: str) -> dict[str, Any]:
  """`task="eval_implicit_reward"`: a DPO-family policy's implicit reward on the eval sets,
  side by side with an explicit RM when `config.eval.reward_model` is set (Lin et al. 2024,
  Table 2: kinds "explicit" then "implicit", so `comparison.accuracy_delta` = implicit −
  explicit).

  Returns:
    as `run_eval_reward`, with kinds "explicit" (when compared) and "implicit".
  """
  mesh, rules = _mesh(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
    fns: dict[str, Any] = {}
    meta: dict[str, Any] = {"task": "eval_implicit_reward"}
    kernels = builders.kernels_for_mesh(config, mesh)
    rm_path = config.eval.get("reward_model")
    if rm_path:
      cfg, params = load_reward_model(rm_path, config.model, mesh=mesh, rules=rules)
      fns["explicit"] = scoring.reward_score_fn(cfg, params, kernels=kernels)
      meta["reward_model"] = rm_path
    fn, info, _, _ = implicit_scorer(
        config.model.init, config.reference.get("init"), config.model,
        method=config.eval.get("method"), beta=config.eval.get("beta"), mesh=mesh, rules=rules,
        chunk_size=int(config.train.get("logps_chunk_size", 128)), kernels=kernels)
    fns["implicit"] = fn
    meta.update(info)
    return _evaluate(config, workdir, fns, meta)
