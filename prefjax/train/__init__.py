"""prefjax.train: train state, the jitted train step, tasks and the loop.

  run(config, workdir)            train config.task in workdir (resumes from its checkpoints)
  TrainState                      step, params, opt_state, ref_params, rng
  make_task(name, ...)            sft | reward | preference | kto
  train_step / jit_train_step     the pure step and its one jit with explicit shardings
  validate(config)                fail-fast config checks (used by prefjax.main)
"""
from prefjax.train.loop import NonFiniteLossError, Trainer, run
from prefjax.train.state import TrainState
from prefjax.train.step import jit_train_step, train_step
from prefjax.train.tasks import TASKS, Task, make_task
from prefjax.train.validation import ConfigError, validate

__all__ = ["ConfigError", "NonFiniteLossError", "TASKS", "Task", "TrainState", "Trainer",
           "jit_train_step", "make_task", "run", "train_step", "validate"]
