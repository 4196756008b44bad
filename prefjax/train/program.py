"""The jitted programs of a training run, built from the config and a mesh.

`build(...)` is the one place that turns `config` + mesh + model config into the optimizer,
the task (loss over the batch layout), the train-state shardings and the jitted train step,
eval step, reference pass and diagnostics. The training loop runs them on real arrays;
`prefjax.aot` lowers and compiles the very same functions on abstract arrays for a TPU
topology, so what it reports is what `prefjax.main` would run.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from prefjax import models
from prefjax.models import lora as lora_lib
from prefjax.train import builders
from prefjax.train import evaluate as eval_lib
from prefjax.train import optimizer as optim_lib
from prefjax.train import reference as ref_lib
from prefjax.train import state as state_lib
from prefjax.train import step as step_lib
from prefjax.train import tasks as tasks_lib
from prefjax.train import data_io


def ref_mode(config: Any) -> str:
  """`reference.mode` for the tasks that have a reference (preference, kto), else "none"."""
  return config.reference.mode if config.task in ("preference", "kto") else "none"


def head_options(config: Any, kernels: models.Kernels) -> tasks_lib.HeadOptions:
  """How the vocabulary head computes log-probs (`train.logps_*` keys, the implementation
  from `kernels.logps_implementation`)."""
  t = config.train
  return tasks_lib.HeadOptions(
      int(t.logps_chunk_size), kernels.logps_implementation,
      bool(t.get("logps_compact", True)), int(t.get("logps_compact_chunk_size", 512)))


def lora_config(config: Any) -> Optional[lora_lib.LoraConfig]:
  """`model.lora.*` as a `LoraConfig`, or None when `model.lora.rank` is 0 / unset."""
  return lora_lib.config_from(config.model.get("lora"))


@dataclasses.dataclass(frozen=True)
class Programs:
  """Everything a run jits, for one config on one mesh.

  Attributes:
    ref_mode: model | precomputed | none.
    layout: the batch layout the task reads (data_io.layout).
    model_cfg: the model trained.
    kernels: how every program computes (`builders.kernels_for_mesh`: the mesh platform's
      defaults with the `config.kernels.*` keys that are set).
    param_sh / abstract_params: parameter shardings and `ShapeDtypeStruct`s carrying them.
    tx / schedule: the optax optimizer and its learning-rate schedule.
    task: the loss over the layout.
    state_sh: `TrainState` of shardings (reference params included when ref_mode=model).
    lora: the LoRA config when the run trains adapters (`model.lora.rank` > 0), else None.
      Then `state.params` is the trainable tree (`lora.trainable_from`: adapters, plus a
      reward task's new head) with shardings `train_sh`, and `state.ref_params` is the
      frozen base model, which is also the reference model.
    train_sh / abstract_train: shardings and `ShapeDtypeStruct`s of `state.params`.
  """
  config: Any
  mesh: Mesh
  ref_mode: str
  layout: str
  head: tasks_lib.HeadOptions
  model_cfg: Any
  kernels: models.Kernels
  param_sh: Any
  abstract_params: Any
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  task: tasks_lib.Task
  state_sh: state_lib.TrainState
  lora: Optional[lora_lib.LoraConfig] = None
  train_sh: Any = None
  abstract_train: Any = None

  @property
  def has_ref_params(self) -> bool:
    """Whether the state holds `ref_params` (the reference model, or a LoRA run's base)."""
    return self.ref_mode == "model" or self.lora is not None

  def abstract_state(self) -> state_lib.TrainState:
    """The train state as `ShapeDtypeStruct`s with their target shardings."""
    return state_lib.abstract_state(
        self.tx, self.abstract_train, self.state_sh, self.has_ref_params,
        abstract_ref=self.abstract_params if self.lora is not None else None)

  def initial_trainable(self, params: Any, seed: int) -> Any:
    """`state.params` of a new run from the initial model `params` (LoRA: fresh adapters)."""
    if self.lora is None:
      return params
    adapters = jax.jit(lambda: lora_lib.init_adapters(self.model_cfg, self.abstract_params,
                                                      self.lora, jax.random.key(seed)),
                       out_shardings=self.train_sh["lora"])()
    return lora_lib.trainable_from(params, adapters, lora_lib.also_trained(self.model_cfg))

  def policy_params(self, state: state_lib.TrainState) -> Any:
    """The trained model's params (LoRA: the base with the adapters merged)."""
    if self.lora is None:
      return state.params
    return jax.jit(lambda b, t: lora_lib.apply(b, t, self.lora, self.model_cfg),
                   out_shardings=self.param_sh)(state.ref_params, state.params)

  def train_step(self, batch_sh: Any) -> Callable:
    """Jitted `(state, batch) -> (state, metrics)`, state donated."""
    return step_lib.jit_train_step(
        self.task, self.tx, self.schedule, self.state_sh, batch_sh, self.mesh,
        accum_steps=int(self.config.optim.grad_accum_steps), kernels=self.kernels)

  def eval_step(self, batch_sh: Any) -> Callable:
    """Jitted `(params, ref_params, batch) -> stats`."""
    ref_sh = self.param_sh if self.has_ref_params else None
    return step_lib.jit_eval_step(self.task, self.train_sh, ref_sh, batch_sh, self.mesh,
                                  kernels=self.kernels)

  def diagnostics(self, batch_sh: Any) -> Optional[Callable]:
    """Jitted eval diagnostics (KL, top-k entropy / mass), or None when the run has none."""
    c = self.config
    if self.config.task not in ("preference", "sft") or not c.eval.get("diagnostics", True):
      return None
    ref_sh = self.param_sh if self.has_ref_params else None
    policy = None
    if self.lora is not None:
      policy = lambda base, t: lora_lib.apply(base, t, self.lora, self.model_cfg)  # noqa: E731
    return eval_lib.jit_diagnostics(self.model_cfg, self.layout, self.train_sh, ref_sh,
                                    batch_sh, self.mesh, int(c.eval.get("topk", 10)),
                                    int(c.train.logps_chunk_size), self.kernels,
                                    policy_params=policy)

  def reference_pass(self) -> Optional[Callable]:
    """Jitted `(ref_params, batch) -> reference log-probs` (ref_mode=precomputed), or None."""
    if self.ref_mode != "precomputed":
      return None
    return ref_lib.make_ref_fn(self.model_cfg, self.layout, self.head, self.param_sh,
                               self.mesh, self.kernels)


def abstract_params(model_cfg: Any, param_sh: Any) -> Any:
  return jax.tree.map(lambda s, h: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=h),
                      models.abstract_params(model_cfg), param_sh)


def build(config: Any, mesh: Mesh, rules: Any, model_cfg: Any, total_steps: int) -> Programs:
  """The run's programs (call inside `jax.set_mesh(mesh)` and the logical axis rules)."""
  mode = ref_mode(config)
  layout = data_io.layout(config)
  kernels = builders.kernels_for_mesh(config, mesh)
  head = head_options(config, kernels)
  param_sh = models.param_shardings(model_cfg, mesh, rules)
  abstract = abstract_params(model_cfg, param_sh)
  tx, schedule = optim_lib.make_optimizer(config.optim, total_steps)
  task = tasks_lib.make_task(config.task, model_cfg=model_cfg, layout=layout,
                             loss_config=config.loss, ref_mode=mode, chunk_size=head,
                             kernels=kernels)
  lcfg = lora_config(config)
  if lcfg is None:
    state_sh = state_lib.state_shardings(tx, abstract, param_sh, mesh, mode == "model")
    return Programs(config, mesh, mode, layout, head, model_cfg, kernels, param_sh, abstract,
                    tx, schedule, task, state_sh, None, param_sh, abstract)
  # LoRA: adapters (small, replicated) and a reward task's new head are trained; the base is
  # the frozen reference.
  abstract_train = lora_lib.abstract_trainable(model_cfg, abstract, lcfg,
                                               NamedSharding(mesh, P()))
  train_sh = jax.tree.map(lambda x: x.sharding, abstract_train)
  task = tasks_lib.with_lora(task, lcfg, model_cfg)
  state_sh = state_lib.state_shardings(tx, abstract_train, train_sh, mesh, True, ref_sh=param_sh)
  return Programs(config, mesh, mode, layout, head, model_cfg, kernels, param_sh, abstract, tx,
                  schedule, task, state_sh, lcfg, train_sh, abstract_train)
