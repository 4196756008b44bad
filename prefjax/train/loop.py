"""`run(config, workdir)`: the training loop.

    process group -> mesh -> model + (sharded) params -> reference -> optimizer -> state
    -> restore (state + data iterator) -> jitted step -> loop: step, log, eval, save

Everything runs under `with jax.set_mesh(mesh), nn.logical_axis_rules(rules):`.
"""
from __future__ import annotations

import gc
import itertools
import json
import logging
import os
import signal
import time
from typing import Any, Optional

import flax.linen as nn
import jax
import numpy as np

from prefjax import checkpoint as ckpt_lib
from prefjax import models
from prefjax import sharding as sharding_lib
from prefjax import workdir as workdir_lib
from prefjax.train import builders
from prefjax.train import data_io
from prefjax.train import evaluate as eval_lib
from prefjax.train import program as program_lib
from prefjax.train import reference as ref_lib
from prefjax.train import state as state_lib
from prefjax.train import step as step_lib
from prefjax.train import validation
from prefjax.train.metrics_writer import MetricsWriter


class NonFiniteLossError(FloatingPointError):
  """The loss or gradient norm of a step was NaN/inf (nothing was saved from it)."""


class StoppedBySignal(Exception):
  """The run stopped on SIGTERM / SIGINT. `checkpoint_step`: the step the workdir resumes
  from (saved at the stop, or the last one before it when the signal came while waiting for
  data). The CLI exits with 128 + the signal number (143 for SIGTERM, 130 for SIGINT)."""

  def __init__(self, signum: int, step: int, checkpoint_step: Optional[int], saved: bool):
    self.signum, self.step, self.checkpoint_step, self.saved = signum, step, checkpoint_step, saved
    name = signal.Signals(signum).name
    if saved:
      what = f"checkpoint saved (step {checkpoint_step})"
    elif checkpoint_step is not None:
      what = f"while waiting for data; the last checkpoint is step {checkpoint_step}"
    else:
      what = "while waiting for data, before any checkpoint"
    super().__init__(f"stopped by {name} at step {step}, {what}; rerun the same command to "
                     "resume")


class _InterruptedWait(BaseException):
  """Raised by the signal handler while the loop is blocked waiting for the next batch."""


class _StopSignal:
  """SIGTERM / SIGINT set a flag; the loop saves a checkpoint and exits cleanly.

  While the loop waits for the next batch (`waiting`), the signal interrupts the wait instead,
  so a pipeline that blocks cannot hold the run; a second signal always stops at once.
  """

  def __init__(self):
    self.signum: Optional[int] = None
    self.waiting = False
    self._old = {}

  def __enter__(self):
    for s in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[s] = signal.signal(s, self._handle)
      except ValueError:  # not the main thread
        pass
    return self

  def _handle(self, signum, _frame):
    if self.signum is not None:  # the second signal: stop now, the default way
      signal.signal(signum, signal.SIG_DFL)
      os.kill(os.getpid(), signum)
      return
    self.signum = signum
    if self.waiting:
      raise _InterruptedWait()

  def __exit__(self, *exc):
    for s, h in self._old.items():
      signal.signal(s, h)

  def requested(self, sync: bool) -> bool:
    """Whether any process got a signal (`sync`: agree across processes)."""
    flag = self.signum is not None
    if jax.process_count() > 1:
      if not sync:
        return False  # act only at sync points, together with the other processes
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      flag = bool(np.any(multihost_utils.process_allgather(np.array(flag))))
    return flag


def run(config: Any, workdir: str) -> dict[str, Any]:
  """Trains `config.task` in `workdir` (resuming if it holds a checkpoint); returns a summary."""
  builders.maybe_initialize_distributed(config.get("distributed"))
  jax.config.update("jax_threefry_partitionable", True)
  mesh, rules = builders.make_mesh(config)
  with workdir_lib.lock(workdir), jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
    trainer = Trainer(config, workdir, mesh, rules)
    try:
      return trainer.fit()
    finally:
      trainer.close()


class Trainer:
  """Holds what the loop needs; `fit()` runs it. Built inside the mesh context."""

  def __init__(self, config: Any, workdir: str, mesh: Any, rules: Any):
    self.config, self.workdir, self.mesh, self.rules = config, workdir, mesh, rules
    self.task_name = config.task
    self.ckpt = None
    self.writer = None
    self.eval_fn = None
    self.diag_fn = None
    self._eval_iter = None
    validation.check_startup_paths(config)  # tokenizer, eval sets, model / reference init
    self._setup_model()
    validation.check_heads(self.model_cfg, dict(mesh.shape), rules)
    # Before anything is written: a resume must not change what the checkpoints hold.
    self._previous_config = self._check_resume()
    ckpt_lib.check_writable(workdir, builders.checkpoint_bytes(
        self.abstract_params, program_lib.ref_mode(config) == "model"))
    self.tokenizer = data_io.load_tokenizer(config)
    validation.check_vocabulary(self.tokenizer.vocab_size, self.model_cfg.vocab_size,
                                str(config.data.get("tokenizer")))
    self.total_steps = data_io.total_steps(config, self.tokenizer)
    # Every jitted program of the run, built as `prefjax.aot` builds them for a TPU slice.
    self.programs = p = program_lib.build(config, mesh, rules, self.model_cfg, self.total_steps)
    self.kernels, self.head, self.ref_mode, self.layout = p.kernels, p.head, p.ref_mode, p.layout
    self.tx, self.schedule, self.task, self.state_sh = p.tx, p.schedule, p.task, p.state_sh
    self.ckpt = ckpt_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"), keep=int(config.ckpt.keep),
        best_metric=config.ckpt.get("best_metric") or None,
        best_mode=config.ckpt.get("best_mode", "max"),
        async_save=bool(config.ckpt.get("async_save", True)))

  # --------------------------------------------------------------------- setup

  def _setup_model(self) -> None:
    c = self.config
    if builders.init_kind(c.model.init) == "none":
      self.model_cfg = builders.model_config(c.model, task=self.task_name)
      self._pretrained = None
    else:
      self.model_cfg, self._pretrained = builders.load_pretrained(
          c.model.init, c.model, task=self.task_name, mesh=self.mesh, rules=self.rules)
    self.param_sh = models.param_shardings(self.model_cfg, self.mesh, self.rules)
    self.abstract_params = program_lib.abstract_params(self.model_cfg, self.param_sh)

  def _config_record(self) -> dict[str, Any]:
    """config.json's contents: the config, plus `resolved_model` (the architecture actually
    trained: for a run initialised from an HF / Flax / GGUF checkpoint it differs from the
    recipe's `model.*` keys; loading this workdir later builds the model from it)."""
    from prefjax.models import config as model_config_lib  # pylint: disable=g-import-not-at-top
    data = json.loads(self.config.to_json_best_effort())
    data["resolved_model"] = model_config_lib.config_to_dict(self.model_cfg)
    return data

  def _check_resume(self) -> Optional[dict[str, Any]]:
    """Refuses a resume whose config changes the checkpoints' shapes or data (one line with
    the diff); returns the saved config when other keys changed (warned), else None."""
    steps = _checkpoint_steps(os.path.join(self.workdir, "checkpoints"))
    path = os.path.join(self.workdir, "config.json")
    if not steps or not os.path.exists(path):
      return None
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)
    saved.pop("resolved_kernels", None)
    warned = workdir_lib.check_resume(saved, self._config_record(), max(steps),
                                      where=f"workdir {self.workdir}")
    return saved if warned else None

  def _write_config(self, start_step: int) -> None:
    """Writes config.json once the state is restored or initialised; a resume that changed
    keys first keeps the previous config as `config.<start_step>.json`."""
    if jax.process_index() != 0:
      return
    if self._previous_config is not None and start_step > 0:
      with open(os.path.join(self.workdir, f"config.{start_step}.json"), "w",
                encoding="utf-8") as f:
        json.dump(self._previous_config, f, indent=1, sort_keys=True)
    data = self._config_record()
    data["resolved_kernels"] = self.kernels.to_dict()  # how it ran (not loaded back)
    tmp = os.path.join(self.workdir, "config.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(self.workdir, "config.json"))

  def _initial_params(self) -> Any:
    if self._pretrained is not None:
      params, self._pretrained = self._pretrained, None
      return params
    return builders.init_params(self.config, self.model_cfg, self.mesh, self.rules)

  def _reference_params(self, params: Any) -> Any:
    """Reference = `reference.init` when set, else a copy of the initial policy."""
    path = self.config.reference.get("init")
    if path:
      _, ref = builders.load_pretrained(path, self.config.model, task=self.task_name,
                                        mesh=self.mesh, rules=self.rules)
      return ref
    return jax.jit(lambda p: p, out_shardings=self.param_sh)(params)

  def _new_state(self) -> state_lib.TrainState:
    params = self._initial_params()
    seed = int(self.config.seed)
    if self.programs.lora is not None:
      # LoRA: the initial model is the frozen base and the reference; adapters are trained.
      if self.config.reference.get("init"):
        raise validation.ConfigError(
            "config.reference.init cannot be combined with config.model.lora.rank > 0: a LoRA "
            "run's reference is its frozen base model")
      if self.ref_mode == "precomputed":
        self._precompute(params)
      trainable = self.programs.initial_trainable(params, seed)
      return state_lib.create_state(trainable, self.tx, self.state_sh, params, seed)
    ref = None
    if self.ref_mode in ("model", "precomputed"):
      ref = self._reference_params(params)
    if self.ref_mode == "precomputed":
      self._precompute(ref)
      ref = None
      gc.collect()
    return state_lib.create_state(params, self.tx, self.state_sh, ref, seed)

  def _precompute(self, ref_params: Any) -> None:
    """One pass of the reference over the train (and eval) batches, into the cache."""
    c = self.config
    self.ref_cache = data_io.ref_cache(c, self.workdir).load()
    fn = self.programs.reference_pass()
    start = self.train_iter.get_state()
    ref_lib.precompute(self.ref_cache, fn, ref_params, self.train_iter, self.mesh,
                       num_batches=self.total_steps)
    self.train_iter.set_state(start)
    if data_io.has_eval(c):
      it = self._eval_batches()
      ref_lib.precompute(self.ref_cache, fn, ref_params, it, self.mesh,
                         num_batches=int(c.eval.num_batches) or 10**9)
    self.ref_cache.save(f"{jax.process_index()}_{os.getpid()}")

  def _eval_batches(self) -> Any:
    """The eval split's local batches, from its start (one pipeline, rewound each time)."""
    if self._eval_iter is None:
      self._eval_iter = data_io.pipeline(self.config, self.tokenizer, "eval")
      self._eval_start = self._eval_iter.get_state()
    self._eval_iter.set_state(self._eval_start)
    n = int(self.config.eval.num_batches) or None
    return itertools.islice(self._eval_iter, n)

  def _restore_or_init(self, data_iter: Any) -> state_lib.TrainState:
    # The newest step whose files match their checksums; damaged newer ones are moved aside.
    step = self.ckpt.latest_intact_step()
    if step is None:
      return self._new_state()
    logging.info("resuming from %s step %d", self.ckpt.directory, step)
    if self.ref_mode == "precomputed":
      self.ref_cache = data_io.ref_cache(self.config, self.workdir).load()
      self._pretrained = None
    return self.ckpt.restore(step, self.programs.abstract_state(), data_iter)

  # --------------------------------------------------------------------- loop

  def _global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    if self.ref_mode == "precomputed":
      local = ref_lib.attach(local, self.ref_cache)
    return sharding_lib.make_global_batch(data_io.model_inputs(local), self.mesh)

  def fit(self) -> dict[str, Any]:
    """Runs (or resumes) training to `total_steps`; returns the last metrics."""
    c = self.config
    self.train_iter = data_iter = data_io.pipeline(c, self.tokenizer, "train")
    if self._eval_due(self.total_steps):
      self._eval_batches()  # opens and validates the eval set(s) before the first step
    state = self._restore_or_init(data_iter)
    start = int(jax.device_get(state.step))
    self._write_config(start)
    self.writer = MetricsWriter(self.workdir, self.total_steps, start,
                                progress=bool(c.log.get("progress", True)))
    self.step_fn = None
    last: dict[str, Any] = {"step": start}
    t_prev = time.perf_counter()
    pending = None  # (step, device metrics, local batch, data wait s) not yet on the host

    def flush():
      # Step N's metrics are fetched after step N+1 is dispatched, so the host never idles
      # the device on a transfer; flushed before anything that must see them (eval, save,
      # the signal check, the end).
      nonlocal pending, t_prev, last
      if pending is not None:
        n, dev_metrics, batch_local, wait = pending
        pending = None
        metrics = jax.device_get(dev_metrics)
        now = time.perf_counter()
        last = self._after_step(n, metrics, batch_local, now - t_prev, wait)
        t_prev = now

    with _StopSignal() as stop:
      step = start
      while step < self.total_steps:
        t_wait = time.perf_counter()
        try:
          stop.waiting = True
          if stop.signum is None:
            local = next(data_iter)
          else:
            raise _InterruptedWait()
        except _InterruptedWait:
          flush()
          self.ckpt.wait()
          raise StoppedBySignal(stop.signum, step, self.ckpt.latest_step(), False) from None
        finally:
          stop.waiting = False
        batch = self._global_batch(local)
        wait = time.perf_counter() - t_wait
        state, metrics = self._train_one(state, batch)
        step += 1
        self.ckpt.check_for_errors()  # a failed background save stops the run here
        flush()
        pending = (step, metrics, local, wait)
        every_log = int(c.log.every_steps)
        due = (self._eval_due(step) or self._save_due(step) or step % every_log == 0
               or step == self.total_steps or _debug_signal_due(c.train, step)
               or stop.requested(sync=False))
        if not due:
          continue
        flush()
        evals = self._maybe_eval(step, state)
        if evals:
          last.update(evals)
        self._maybe_save(step, state, data_iter, evals)
        _debug_signal(c.train, step)
        if stop.requested(sync=step % every_log == 0):
          logging.warning("signal %s: saving step %d and exiting", stop.signum, step)
          self._save(step, state, data_iter, None, force=True)
          self.ckpt.wait()
          raise StoppedBySignal(stop.signum or signal.SIGTERM, step, step, True)
      else:
        flush()
        self._save(step, state, data_iter, None, force=True)
    self.ckpt.wait()
    self.final_state = state
    return last

  def _train_one(self, state, batch):
    if self.step_fn is None:
      self.batch_sh = step_lib.batch_shardings(batch, self.mesh)
      self.step_fn = self.programs.train_step(self.batch_sh)
    with jax.transfer_guard("disallow"):
      return self.step_fn(state, batch)

  def _after_step(self, step: int, metrics: Any, local: dict, dt: float,
                  data_wait: float) -> dict[str, Any]:
    m = {k: float(v) for k, v in metrics.items()}
    if m.pop("nonfinite") > 0:
      msg = (f"non-finite loss or gradient at step {step} (loss={m['loss']}, "
             f"grad_norm={m['grad_norm']}); the update was not applied")
      if not self.config.train.get("skip_nonfinite", False):
        raise NonFiniteLossError(msg + "; stopping without saving it. Set "
                                 "--config.train.skip_nonfinite=True to skip such steps.")
      logging.warning("%s; skipped (train.skip_nonfinite=True)", msg)
      m["skipped"] = 1.0
    tokens = data_io.real_tokens(local) * jax.process_count()
    m["tokens_per_s"] = tokens / max(dt, 1e-9)
    m["perf/step_s"] = dt
    m["perf/data_wait_s"] = data_wait  # host time to get and shard the batch
    self.writer.progress(step, m["loss"], m["tokens_per_s"])
    every = int(self.config.log.every_steps)
    if step % every == 0 or step == 1 or step == self.total_steps:
      # Records dropped so far, by reason (found when the index was built, and after
      # truncation in this process: with grain worker processes those stay in the workers).
      dropped = getattr(self.train_iter, "dropped", None)
      if dropped is not None:
        m.update({f"data/dropped/{r}": float(n) for r, n in sorted(dropped.counts.items())})
      self.writer.write(step, m)
    return {"step": step, **m}

  def _eval_due(self, step: int) -> bool:
    every = int(self.config.eval.every_steps)
    if not every or not data_io.has_eval(self.config):
      return False
    return step % every == 0 or step == self.total_steps

  def _save_due(self, step: int) -> bool:
    every = int(self.config.ckpt.every_steps)
    return bool(every and step % every == 0)

  def _maybe_eval(self, step: int, state) -> Optional[dict[str, float]]:
    if not self._eval_due(step):
      return None
    ev = self.evaluate(state)
    self.writer.write(step, ev)
    return ev

  def evaluate(self, state) -> dict[str, float]:
    """Eval metrics (and diagnostics) of `state` on the eval split."""
    it = (self._global_batch(b) for b in self._eval_batches())
    b0 = next(it)
    if self.eval_fn is None:
      self._build_eval(b0)
    out = eval_lib.run_eval(self.eval_fn, state.params, state.ref_params, _prepend(b0, it))
    if self.diag_fn is not None:
      out.update(eval_lib.diag_metrics(jax.device_get(
          self.diag_fn(state.params, state.ref_params, b0))))
    return out

  def _build_eval(self, batch) -> None:
    bsh = step_lib.batch_shardings(batch, self.mesh)
    self.eval_fn = self.programs.eval_step(bsh)
    self.diag_fn = self.programs.diagnostics(bsh)

  def _maybe_save(self, step: int, state, data_iter, evals) -> None:
    if self._save_due(step) or (evals and self.ckpt.best_metric):
      self._save(step, state, data_iter, evals)

  def _save(self, step, state, data_iter, evals, force=False) -> None:
    if self.ckpt.latest_step() == step:
      return
    self.ckpt.save(step, state, data_iter, metrics=evals, force=force)

  def close(self) -> None:
    if self.ckpt is not None:
      self.ckpt.close()
    if self.writer is not None:
      self.writer.close()
    for it in (getattr(self, "train_iter", None), self._eval_iter):
      if it is not None and hasattr(it, "close"):
        it.close()  # stops grain worker processes before the interpreter exits


def _debug_signal_due(train_cfg: Any, step: int) -> bool:
  return int(train_cfg.get("debug_signal_at_step", 0) or 0) == step


def _debug_signal(train_cfg: Any, step: int) -> None:
  """Fault injection for tests: this process sends itself `train.debug_signal` after a step."""
  at = int(train_cfg.get("debug_signal_at_step", 0) or 0)
  if at and step == at:
    os.kill(os.getpid(), getattr(signal, train_cfg.get("debug_signal", "SIGKILL")))


def _checkpoint_steps(directory: str) -> list[int]:
  """Step numbers of the checkpoint folders in `directory` (local; [] for object stores)."""
  if "://" in directory or not os.path.isdir(directory):
    return []
  return [int(n) for n in os.listdir(directory) if n.isdigit()]


def _prepend(first, rest):
  yield first
  yield from rest
