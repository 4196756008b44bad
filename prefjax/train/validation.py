"""`validate(config)`: fail fast, with messages that name the key, before anything is built."""
from __future__ import annotations

import inspect
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from prefjax import losses as losses_lib
from prefjax import sharding as sharding_lib

TRAIN_TASKS = ("sft", "reward", "preference", "kto")
OTHER_TASKS = ("export",)
FUTURE_TASKS = ("eval_reward", "eval_implicit_reward", "generate", "iterative_dpo")
REWARD_LOSSES = ("bradley_terry", "kwise")
REF_MODES = ("model", "precomputed", "none")
# config.loss keys the trainer reads itself (not passed to the loss function).
_TASK_LOSS_KEYS = {"reward": ("use_margin", "center_rewards_coefficient", "beta")}


class ConfigError(ValueError):
  """A config that cannot run; the message names the offending key."""


def _check(cond: bool, msg: str) -> None:
  if not cond:
    raise ConfigError(msg)


def needs_reference(loss: Callable, loss_kwargs: dict) -> bool:
  """Whether a paired loss needs reference log-probs (it raises without them)."""
  z = jnp.zeros((2,), jnp.float32)
  lp = losses_lib.PairedLogps(chosen=z, rejected=z, chosen_lengths=z + 1, rejected_lengths=z + 1)
  try:
    jax.eval_shape(lambda: loss(lp, **loss_kwargs))
  except (ValueError, TypeError, AttributeError):
    return True
  return False


def _check_kwargs(fn: Callable, kwargs: dict, name: str) -> None:
  params = inspect.signature(fn).parameters
  if any(p.kind == p.VAR_KEYWORD for p in params.values()):
    return
  allowed = [k for k, p in params.items() if p.kind == p.KEYWORD_ONLY]
  for k in kwargs:
    _check(k in params, f"config.loss.{k} is not a hyperparameter of loss {name!r}; "
           f"it takes {allowed}")


def _validate_loss(config: Any) -> None:
  task, loss = config.task, config.loss
  kwargs = {k: v for k, v in dict(loss).items() if k != "name" and v is not None}
  if task in ("preference", "kto"):
    bad = losses_lib.hyperparameter_errors(kwargs)
    _check(not bad, f"config.loss.{bad[0] if bad else ''} (loss {loss.name!r})")
  mode = config.reference.mode
  if task == "preference":
    _check(loss.name in losses_lib.names(), f"unknown config.loss.name {loss.name!r}; "
           f"known paired losses: {', '.join(losses_lib.names())}")
    fn = losses_lib.get(loss.name)
    _check_kwargs(fn, kwargs, loss.name)
    _check(mode in REF_MODES, f"config.reference.mode={mode!r}; expected one of {REF_MODES}")
    need = needs_reference(fn, kwargs)
    _check(not (need and mode == "none"),
           f"loss {loss.name!r} needs reference log-probs but config.reference.mode='none'; "
           "use 'model' or 'precomputed'")
    _check(need or mode == "none",
           f"loss {loss.name!r} is reference-free; set config.reference.mode='none' "
           f"(got {mode!r}, which would hold or compute an unused reference)")
  elif task == "kto":
    names = losses_lib.unpaired_names()
    _check(loss.name in names, f"unknown config.loss.name {loss.name!r} for task 'kto'; "
           f"known unpaired losses: {', '.join(names)}")
    _check_kwargs(losses_lib.get_unpaired(loss.name), kwargs, loss.name)
    _check(mode == "model", f"task 'kto' needs config.reference.mode='model', got {mode!r}")
  elif task == "reward":
    _check(loss.name in REWARD_LOSSES, f"unknown config.loss.name {loss.name!r} for task "
           f"'reward'; expected one of {REWARD_LOSSES}")
    if loss.name == "kwise":
      rest = {k: v for k, v in kwargs.items() if k not in _TASK_LOSS_KEYS["reward"]}
      _check_kwargs(losses_lib.kwise_ranking, rest, "kwise")
    else:
      extra = [k for k in kwargs if k not in _TASK_LOSS_KEYS["reward"]]
      _check(not extra, f"config.loss.{extra[0] if extra else ''} is not used by "
             f"bradley_terry; it takes {list(_TASK_LOSS_KEYS['reward'][:2])}")


def _validate_batch(config: Any, num_devices: int, procs: int) -> None:
  dcn = {k: int(v) for k, v in dict(config.get("dcn_mesh") or {}).items()}
  slices = 1
  for v in dcn.values():
    _check(v >= 1, f"config.dcn_mesh={dcn}: sizes must be >= 1")
    slices *= v
  _check(num_devices % slices == 0, f"config.dcn_mesh={dcn} asks for {slices} slices, which "
         f"do not divide the {num_devices} devices")
  try:
    shape = sharding_lib.resolve_mesh_shape(dict(config.mesh), num_devices // slices)
  except ValueError as e:
    raise ConfigError(f"config.mesh: {e}") from None
  shards = shape[0] * shape[1] * dcn.get("data", 1) * dcn.get("fsdp", 1)
  bs, accum = int(config.data.batch_size), int(config.optim.grad_accum_steps)
  _check(accum >= 1, f"config.optim.grad_accum_steps={accum} must be >= 1")
  _check(bs > 0 and bs % procs == 0, f"config.data.batch_size={bs} must be a positive multiple "
         f"of the number of processes ({procs})")
  _check(bs % (accum * shards) == 0,
         f"config.data.batch_size={bs} must be divisible by grad_accum_steps ({accum}) x batch "
         f"shards (mesh data x fsdp = {shards}) = {accum * shards}")
  ebs = int(config.data.get("eval_batch_size") or bs)
  _check(ebs % shards == 0 and ebs % procs == 0,
         f"config.data.eval_batch_size={ebs} must be divisible by the {shards} batch shards "
         f"and {procs} processes")


def _validate_kernels(config: Any) -> None:
  """`config.kernels.*`: known names and sizes (checked against the CPU defaults; the platform
  itself is only known once the mesh exists)."""
  from prefjax.train import builders  # pylint: disable=import-outside-toplevel
  train = config.get("train") or {}
  for key in ("cpu_scheduler", "logps_implementation"):
    _check(key not in train, f"config.train.{key} is now config.kernels.{key}")
  try:
    builders.kernels_from_config(config, "cpu")
  except ValueError as e:
    raise ConfigError(f"config.{e}" if str(e).startswith("kernels.") else
                      f"config.kernels: {e}") from None


def validate(config: Any, *, num_devices: int | None = None,
             num_processes: int | None = None) -> None:
  """Raises ConfigError naming the key for configs that cannot run.

  `num_devices` / `num_processes` describe the job the config will run on (default: this
  one's; `prefjax.aot` passes the TPU topology's)."""
  task = config.get("task")
  known = TRAIN_TASKS + OTHER_TASKS + FUTURE_TASKS
  _check(task in known, f"unknown config.task {task!r}; tasks: {', '.join(known)}")
  _validate_kernels(config)
  if task in OTHER_TASKS or task in FUTURE_TASKS:
    return  # export / eval / generate / iterative DPO check their own keys
  _check(int(config.get("total_steps") or 0) > 0 or float(config.get("num_epochs") or 0) > 0,
         "set config.total_steps > 0 or config.num_epochs > 0")
  _check(float(config.optim.learning_rate) >= 0, "config.optim.learning_rate must be >= 0")
  _check(config.optim.schedule in ("cosine", "linear", "constant"),
         f"config.optim.schedule={config.optim.schedule!r}; expected cosine | linear | constant")
  layout = config.data.get("layout", "padded")
  _check(layout in ("padded", "packed", "prompt_shared"),
         f"config.data.layout={layout!r}; expected padded | packed | prompt_shared")
  validate_data_keys(config.data)
  _check(not (task in ("sft", "kto") and layout != "padded"),
         f"task {task!r} needs config.data.layout='padded' (packing is for pairs)")
  best = config.ckpt.get("best_metric") or ""
  _check(not best or best.startswith("eval/"),
         f"config.ckpt.best_metric={best!r} must name an eval metric (eval/...)")
  _check(int(config.ckpt.keep) >= 1, "config.ckpt.keep must be >= 1")
  _check(int(config.log.every_steps) >= 1, "config.log.every_steps must be >= 1")
  for key in ("ckpt.every_steps", "eval.every_steps", "total_steps"):
    section, _, name = key.rpartition(".")
    value = (config[section] if section else config).get(name) or 0
    _check(int(value) >= 0, f"config.{key}={value} must be >= 0 (0: never / derive)")
  _validate_loss(config)
  _validate_batch(config, jax.device_count() if num_devices is None else num_devices,
                  jax.process_count() if num_processes is None else num_processes)


def check_vocabulary(tokenizer_size: int, model_vocab: int, tokenizer: str) -> None:
  """Token ids must index the model's embedding: a tokenizer with more pieces than the model
  has rows would read past it (NaN at the first step); Gemma's padded 256128-row tables
  hold its 256000-piece tokenizer."""
  _check(tokenizer_size <= model_vocab,
         f"data.tokenizer={tokenizer!r} has {tokenizer_size} pieces but the model's vocabulary "
         f"has {model_vocab} rows (model.vocab_size / model.init): token ids >= {model_vocab} "
         "would index past the embedding; use the model's own tokenizer")



# Enumerated `data.*` keys: key -> allowed values (`data.format` also takes "auto").
def _data_choices() -> dict[str, tuple[str, ...]]:
  from prefjax.data import formats, templates  # pylint: disable=import-outside-toplevel
  return {
      "format": ("auto",) + tuple(formats.FORMATS),
      "kind": ("pairs", "unpaired", "sft", "rankings"),
      "layout": ("padded", "packed", "prompt_shared"),
      "on_bad_record": ("error", "skip"),
      "chat_template": tuple(templates.TEMPLATES),
  }


def validate_data_keys(data: Any) -> None:
  """Each enumerated `data.*` key holds one of its allowed values (one line listing them)."""
  from prefjax.data import config as data_config  # pylint: disable=import-outside-toplevel
  for key, allowed in _data_choices().items():
    value = data_config.get(data, key)
    _check(value in allowed, f"config.data.{key}={value!r}; expected one of: "
           f"{', '.join(allowed)}")


def _local(path: str) -> bool:
  return "://" not in path


def _eval_paths(spec: Any) -> list[tuple[str, str]]:
  """(key, path) of every local path or glob `data.eval` names (tfds and URLs skipped)."""
  if spec is None:
    return []
  if hasattr(spec, "items"):
    return [(f"config.data.eval.{k}", p) for k, v in spec.items() for _, p in _eval_paths(v)]
  if isinstance(spec, (list, tuple)):
    return [kp for v in spec for kp in _eval_paths(v)]
  spec = str(spec)
  if not _local(spec) or spec.startswith("tfds:"):
    return []
  return [("config.data.eval", spec)]


def check_data_paths(config: Any) -> None:
  """`data.tokenizer` and the local `data.eval` files exist (before a model is built)."""
  import glob  # pylint: disable=import-outside-toplevel
  import os  # pylint: disable=import-outside-toplevel
  from prefjax.data import config as data_config  # pylint: disable=import-outside-toplevel
  from prefjax.data import tokenizer as tok_lib  # pylint: disable=import-outside-toplevel
  name = str(data_config.get(config.data, "tokenizer"))
  try:
    path = tok_lib._resolve(name)  # pylint: disable=protected-access
  except FileNotFoundError as e:
    raise ConfigError(f"config.data.tokenizer: {e}") from None
  if _local(path):
    _check(os.path.isfile(os.path.expanduser(path)),
           f"config.data.tokenizer={name!r}: no such file {path!r} (expected a SentencePiece "
           "tokenizer.model, a .gguf file, or a name: mistral_v1, gemma, gemma3)")
  for key, spec in _eval_paths(config.data.get("eval")):
    p = os.path.expanduser(spec)
    found = glob.glob(p) if glob.has_magic(p) else ([p] if os.path.exists(p) else [])
    _check(bool(found), f"{key}={spec!r}: no such file" + (" (glob matched nothing)"
                                                           if glob.has_magic(p) else ""))
    for f in found:
      _check(os.access(f, os.R_OK), f"{key}={spec!r}: {f} is not readable")


def describe_init_path(path: str) -> str:
  """What a `model.init` / `reference.init` local path holds: a short description used when
  it cannot be loaded (missing / empty / unrecognised ...)."""
  import os  # pylint: disable=import-outside-toplevel
  if not os.path.exists(path):
    return "does not exist"
  if os.path.isfile(path):
    return "is a file that is neither a .gguf model nor a checkpoint directory"
  entries = os.listdir(path)
  if not entries:
    return "is an empty directory"
  ckpts = os.path.join(path, "checkpoints")
  if os.path.isdir(ckpts) and not any(e.isdigit() for e in os.listdir(ckpts)):
    return "is a prefjax workdir without any checkpoint step"
  return f"is a directory with no checkpoint in it (holds {', '.join(sorted(entries)[:5])})"


_INIT_EXPECTED = ("expected a prefjax workdir (with checkpoints/<step>), a Hugging Face "
                  "directory (config.json + *.safetensors), a .gguf file, or a Flax / Orbax "
                  "params checkpoint directory")


def check_init_path(key: str, path: Optional[str]) -> None:
  """`model.init` / `reference.init` (`key`) names something loadable: one line saying what
  the path holds and what was expected otherwise."""
  import os  # pylint: disable=import-outside-toplevel
  if not path or not _local(str(path)):
    return
  path = os.path.expanduser(str(path))
  ok = False
  if path.endswith(".gguf"):
    ok = os.path.isfile(path)
  elif os.path.isdir(os.path.join(path, "checkpoints")):
    ckpts = os.path.join(path, "checkpoints")
    ok = any(e.isdigit() for e in os.listdir(ckpts))
  elif os.path.isfile(os.path.join(path, "config.json")):
    ok = True  # Hugging Face directory: the loader names missing weight files
  elif os.path.isdir(path):
    entries = [e for e in os.listdir(path) if not e.startswith(".")]
    ok = bool(entries) and ("_METADATA" in entries or "_CHECKPOINT_METADATA" in entries
                            or "checkpoint" in entries or any(
                                os.path.isdir(os.path.join(path, e)) for e in entries))
  _check(ok, f"config.{key}={path!r} {describe_init_path(path)}; {_INIT_EXPECTED}")


def check_startup_paths(config: Any) -> None:
  """Every local path the config names for a training run, before anything is built."""
  check_init_path("model.init", config.model.get("init"))
  check_init_path("reference.init", (config.get("reference") or {}).get("init"))
  check_data_paths(config)


def check_heads(model_cfg: Any, mesh_shape: dict, rules: Any) -> None:
  """`mesh.tensor` divides the attention heads it shards (num_heads; num_kv_heads when the
  sharding rules split KV heads too)."""
  tensor = int(mesh_shape.get("tensor", 1))
  if tensor <= 1:
    return
  n, k = int(model_cfg.num_heads), int(model_cfg.num_kv_heads)
  sharded_kv = any(name in ("kv_heads", "activation_kv_heads") and axis is not None and
                   "tensor" in (axis if isinstance(axis, (tuple, list)) else (axis,))
                   for name, axis in rules)
  _check(n % tensor == 0 and (not sharded_kv or k % tensor == 0),
         f"config.mesh.tensor={tensor} must divide the model's attention heads "
         f"(num_heads={n}, num_kv_heads={k}" + ("" if sharded_kv else ", KV heads unsplit")
         + ")")
