"""Helpers for the end-to-end tests: a small JSONL dataset, configs, running the CLI."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[2]

_WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron "
          "pi rho sigma tau upsilon phi chi psi omega").split()


def write_pairs(path: pathlib.Path, n: int = 64, seed: int = 0) -> str:
  """`n` explicit preference records; the chosen response repeats the prompt's first word."""
  rng = np.random.default_rng(seed)
  with open(path, "w", encoding="utf-8") as f:
    for i in range(n):
      words = [_WORDS[j] for j in rng.integers(0, len(_WORDS), 4)]
      prompt = f"q{i}: " + " ".join(words)
      chosen = " ".join([words[0]] * 3)
      rejected = " ".join(_WORDS[j] for j in rng.integers(0, len(_WORDS), 3))
      f.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
  return str(path)


def overrides(data_path: str, **extra) -> list[str]:
  """CLI overrides for a fast toy run of configs/quickstart.py:runlocal on `data_path`."""
  base = {
      "data.train": data_path, "data.format": "explicit", "data.chat_template": "none",
      "data.split_fraction": 0.75, "data.batch_size": 8, "data.max_len": 32,
      "data.max_prompt_len": 16, "data.max_response_len": 16, "total_steps": 6,
      "ckpt.every_steps": 2, "log.every_steps": 1, "eval.every_steps": 3,
      "eval.num_batches": 1, "log.progress": False, "optim.learning_rate": 1e-3,
      "reference.mode": "model", "optim.schedule": "constant",
  }
  base.update(extra)
  return [f"--config.{k}={v}" for k, v in base.items()]


def train_toy_run(root: pathlib.Path) -> tuple[pathlib.Path, str]:
  """Trains the toy run of `overrides` (checkpoints at steps 2, 4, 6) in `root/run`; returns
  (run dir, data path)."""
  data = write_pairs(root / "pairs.jsonl")
  r = run_main(str(root / "run"), overrides(data))
  assert r.returncode == 0, r.stderr[-3000:]
  return root / "run", data


def copy_run(run: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
  """A copy of a trained run dir at `tmp_path/run` (one per test that damages or resumes it)."""
  import shutil  # pylint: disable=g-import-not-at-top
  dst = tmp_path / "run"
  shutil.copytree(run, dst)
  return dst


def run_main(workdir: str, args: list[str], config: str = "configs/quickstart.py:runlocal",
             env_extra: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
  env = dict(os.environ)
  env.setdefault("JAX_PLATFORMS", "cpu")
  env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
  env.update(env_extra or {})
  cmd = [sys.executable, "-m", "prefjax.main", f"--config={config}", f"--workdir={workdir}",
         *args]
  return subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True,
                        timeout=timeout)


def losses(workdir: str) -> dict[int, float]:
  """step -> training loss from metrics.jsonl (eval lines skipped)."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    for line in f:
      row = json.loads(line)
      if "loss" in row:
        out[row["step"]] = row["loss"]
  return out


def eval_rows(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [r for r in map(json.loads, f) if any(k.startswith("eval/") for k in r)]


def final_params(workdir: str) -> dict[str, np.ndarray]:
  """Flattened params of the latest checkpoint (read with Orbax, no target)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  step = mngr.latest_step()
  tree = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  mngr.close()
  flat = {}
  def walk(prefix, node):
    if isinstance(node, dict):
      for k, v in node.items():
        walk(f"{prefix}/{k}", v)
    else:
      flat[prefix] = np.asarray(node)
  walk("", tree["state"]["params"])
  return flat
