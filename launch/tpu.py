r"""Create a TPU VM / pod slice, ship this checkout to every worker, run a recipe on all workers.

  python launch/tpu.py all --name=pj-v4 --zone=us-central2-b --accelerator=v4-32 \
      --config=configs/dpo_gemma7b.py --workdir=gs://BUCKET/runs/dpo7b \
      --override=model.init=gs://BUCKET/gemma-7b-sft --override=data.train=gs://BUCKET/train.jsonl \
      --dry-run

Steps (each also a subcommand):
  `create`  gcloud compute tpus tpu-vm create, with the TPU software version (`--version`) picked
            from the accelerator generation (see SOFTWARE_VERSIONS; `--version` overrides).
  `install` builds a wheel of this checkout (`python -m pip wheel --no-deps`), stages it with
            `configs/` in build/tpu/prefjax, copies that folder to ~/prefjax on every worker
            (`gcloud compute tpus tpu-vm scp --recurse ... --worker=all`), then on every worker
            makes a Python >= 3.11 venv (~/prefjax/venv; jax 0.10.2 needs 3.11, the TPU images
            ship 3.10) and pip-installs the wheel together with `jax[tpu]==0.10.2` (libtpu comes
            from PyPI). `--repo=REQ` installs that pip requirement instead (a git URL is also
            cloned to ~/prefjax for its configs/) and builds no wheel.
  `run`     the same `python -m prefjax.main` command on all workers (`--worker=all`):
            jax.distributed initialises itself on a pod. Re-running resumes from the workdir's
            last checkpoint.
  `delete`  deletes the TPU VM.
`all` = install's local build, create, then install's copy and pip install, then run.
`--dry-run` prints every command without running it; `run` / `all` warn (stderr) when the recipe
still trains a randomly initialised model (`model.init` unset) or on the shipped HH-RLHF sample.
"""
from __future__ import annotations

import argparse
import ast
import glob
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from typing import Any, Callable, Sequence

JAX_VERSION = "0.10.2"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE_DIR = os.path.join(REPO_ROOT, "build", "tpu", "prefjax")  # copied to ~/prefjax on workers
REMOTE_DIR = "prefjax"  # relative to the worker's home directory
VENV = f"{REMOTE_DIR}/venv"

# TPU software version (`gcloud compute tpus tpu-vm create --version`) per accelerator
# generation, for JAX / PyTorch, from Google Cloud's "TPU software versions" page,
# https://cloud.google.com/tpu/docs/runtimes ("v4 and earlier: tpu-ubuntu2204-base").
SOFTWARE_VERSIONS = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",  # v5e
    "v5e": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",  # Trillium
}


def software_version(accelerator: str) -> str:
  """Default `--version` for an accelerator type such as v4-32, v5litepod-16, v5p-8, v6e-8."""
  generation = accelerator.lower().split("-")[0]
  if generation not in SOFTWARE_VERSIONS:
    raise ValueError(f"no default TPU software version for accelerator {accelerator!r} "
                     f"(known generations: {', '.join(sorted(SOFTWARE_VERSIONS))}); pass --version")
  return SOFTWARE_VERSIONS[generation]


def _base(args: argparse.Namespace) -> list[str]:
  out = ["--zone", args.zone]
  if args.project:
    out += ["--project", args.project]
  return out


def create_cmd(args: argparse.Namespace) -> list[str]:
  version = args.version or software_version(args.accelerator)
  cmd = ["gcloud", "compute", "tpus", "tpu-vm", "create", args.name, *_base(args),
         "--accelerator-type", args.accelerator, "--version", version]
  if args.spot:
    cmd.append("--spot")
  return cmd


def ssh_cmd(args: argparse.Namespace, remote: str) -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.name,
          *_base(args), "--worker=all", "--command", remote]


def wheel_name() -> str:
  """File name of the wheel `pip wheel` builds from this checkout (version from setup.py)."""
  with open(os.path.join(REPO_ROOT, "setup.py"), encoding="utf-8") as f:
    m = re.search(r"""version\s*=\s*["']([^"']+)["']""", f.read())
  if not m:
    raise ValueError("no version= in setup.py")
  return f"prefjax-{m.group(1)}-py3-none-any.whl"


def _built_wheel(args: argparse.Namespace) -> str:
  """The staged wheel's file name: the one actually built (real runs) or the predicted one."""
  found = sorted(glob.glob(os.path.join(args.stage_dir, "prefjax-*.whl")))
  if not args.dry_run and len(found) == 1:
    return os.path.basename(found[0])
  return wheel_name()


def build_cmd(args: argparse.Namespace) -> list[str]:
  """Builds the wheel of this checkout into the stage folder (no extra build dependency)."""
  return [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", args.stage_dir, REPO_ROOT]


def stage_cmd(args: argparse.Namespace) -> list[str]:
  """Puts the recipes next to the wheel: the wheel holds the `prefjax` package only."""
  return ["cp", "-R", os.path.join(REPO_ROOT, "configs"), args.stage_dir.rstrip(os.sep) + os.sep]


def scp_cmd(args: argparse.Namespace) -> list[str]:
  """Copies the stage folder to ~/prefjax on every worker."""
  return ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse",
          args.stage_dir.rstrip(os.sep),
          f"{args.name}:~/", "--worker=all", *_base(args)]


def _git_source(repo: str) -> tuple[str, str] | None:
  """(clone URL, ref) of a pip VCS requirement or git URL; None for other requirements."""
  url = repo.split("#", 1)[0]
  if url.startswith("git+"):
    url = url[len("git+"):]
  elif not (url.endswith(".git") or url.startswith("git@")):
    return None
  head, sep, ref = url.rpartition("@")
  if sep and "/" not in ref and ":" not in ref and "/" in head.split("//", 1)[-1]:
    return head, ref
  return url, ""


def install_remote(args: argparse.Namespace) -> str:
  py = args.python
  pip = f"{VENV}/bin/python -m pip"
  steps = []
  if args.repo:
    requirement = args.repo
    git = _git_source(args.repo)
    if git:  # the recipes (configs/) come from the same repository
      url, ref = git
      clone = f"git clone -q {shlex.quote(url)} {REMOTE_DIR}"
      if ref:
        clone += f" && git -C {REMOTE_DIR} checkout -q {shlex.quote(ref)}"
      steps.append(f"(test -d {REMOTE_DIR}/.git || ({clone}))")
  else:
    requirement = f"{REMOTE_DIR}/{_built_wheel(args)}"
  steps += [
      # jax 0.10.2 needs Python >= 3.11; the TPU VM images have 3.10 as python3.
      f"(test -x {VENV}/bin/python || (sudo apt-get -q update && sudo apt-get -q install -y "
      f"-o DPkg::Lock::Timeout=600 {py} {py}-venv && {py} -m venv {VENV}))",
      f"{pip} install -q -U pip",
      f"{pip} uninstall -q -y prefjax",  # a rebuilt wheel of the same version replaces the old
      f"{pip} install {shlex.quote(requirement)} {shlex.quote(f'jax[tpu]=={JAX_VERSION}')}",
  ]
  return " && ".join(steps)


def install_cmd(args: argparse.Namespace) -> list[str]:
  return ssh_cmd(args, install_remote(args))


def run_remote(args: argparse.Namespace) -> str:
  flags = [f"--config={args.config}", f"--workdir={args.workdir}"]
  flags += [f"--config.{o}" for o in args.override]
  main = "venv/bin/python -m prefjax.main " + " ".join(shlex.quote(f) for f in flags)
  log = "$HOME/prefjax_run.log"
  prefix = f"cd {REMOTE_DIR} && "
  return f"{prefix}nohup {main} > {log} 2>&1 &" if args.detach else prefix + main


def run_cmd(args: argparse.Namespace) -> list[str]:
  return ssh_cmd(args, run_remote(args))


def delete_cmd(args: argparse.Namespace) -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "delete", args.name, *_base(args), "--quiet"]


Builder = Callable[[argparse.Namespace], list[str]]


def steps(args: argparse.Namespace) -> list[Builder]:
  """The command builders of a step, in order (local wheel build first, so it fails early)."""
  local = [] if args.repo else [build_cmd, stage_cmd]
  remote = [install_cmd] if args.repo else [scp_cmd, install_cmd]
  return {"create": [create_cmd], "install": local + remote, "run": [run_cmd],
          "delete": [delete_cmd], "all": local + [create_cmd] + remote + [run_cmd]}[args.step]


CHECKED_KEYS = ("model.init", "data.train")


def load_recipe(config: str, overrides: Sequence[str]) -> Any:
  """The recipe's ConfigDict (`path.py[:arg]`, as prefjax.main reads it) with the overrides."""
  path, _, arg = config.partition(":")
  if not os.path.isabs(path) and not os.path.exists(path):
    path = os.path.join(REPO_ROOT, path)
  if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)  # `from configs import common`, `prefjax` from the checkout
  spec = importlib.util.spec_from_file_location("_prefjax_recipe", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(arg) if arg else module.get_config()
  for o in overrides:
    key, _, text = o.partition("=")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    *parents, leaf = key.split(".")
    try:
      node = c
      for p in parents:
        node = node[p]
      node[leaf] = value
    except (KeyError, TypeError, ValueError, AttributeError):
      if key in CHECKED_KEYS:
        raise  # other keys do not matter to recipe_warnings; prefjax.main checks them
  return c


def recipe_warnings(config: str, overrides: Sequence[str]) -> list[str]:
  """Why the recipe is probably not what a pod run wants (empty: nothing to warn about)."""
  try:
    c = load_recipe(config, overrides)
  except Exception as e:  # pylint: disable=broad-except
    return [f"could not load {config} to check model.init / data.train: {e!r}"]
  out = []
  if c.get("model") is not None and c.model.get("init") is None:
    out.append(f"{config}: model.init is unset, so the run trains a randomly initialised model; "
               "pass --override=model.init=gs://BUCKET/CHECKPOINT (HF dir or Flax checkpoint)")
  train = c.get("data") and c.data.get("train")
  if train is not None and "hh_rlhf_helpful_base" in str(train):
    out.append(f"{config}: data.train is the small HH-RLHF sample shipped with prefjax; "
               "pass --override=data.train=gs://BUCKET/train.jsonl")
  if "/" in config and not config.partition(":")[0].startswith("configs/"):
    out.append(f"{config}: only configs/ is copied to the workers; the recipe must be there")
  return out


def parse(argv: Sequence[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("step", choices=["all", "create", "delete", "install", "run"])
  p.add_argument("--name", required=True, help="TPU VM name")
  p.add_argument("--zone", required=True, help="e.g. us-central2-b")
  p.add_argument("--project", default=None, help="GCP project (default: gcloud's)")
  p.add_argument("--accelerator", default="v4-8", help="v4-8, v4-32, v5litepod-16, v5p-8, v6e-8, ...")
  p.add_argument("--version", default=None,
                 help="TPU software version (default: by --accelerator generation, SOFTWARE_VERSIONS)")
  p.add_argument("--spot", action="store_true", help="spot / preemptible capacity")
  p.add_argument("--repo", default=None,
                 help="pip requirement to install instead of a wheel of this checkout, e.g. "
                      "git+https://github.com/YOU/prefjax.git@BRANCH (a git URL is also cloned "
                      "to ~/prefjax for its configs/)")
  p.add_argument("--python", default="python3.11",
                 help="worker interpreter for the venv (apt packages PY and PY-venv), >= 3.11")
  p.add_argument("--stage-dir", default=STAGE_DIR,
                 help="local folder for the wheel and configs/; its last name is the folder on "
                      f"the workers, which must be {REMOTE_DIR!r}")
  p.add_argument("--config", default="configs/quickstart.py", help="recipe[:arg]")
  p.add_argument("--workdir", default=None, help="run directory (gs:// on pods)")
  p.add_argument("--override", action="append", default=[], help="key=value (repeatable)")
  p.add_argument("--detach", action="store_true", help="run in the background (nohup)")
  p.add_argument("--dry-run", action="store_true", help="print the commands only")
  args = p.parse_args(argv)
  if args.step in ("run", "all") and not args.workdir:
    p.error("--workdir is required for run / all")
  if os.path.basename(os.path.normpath(args.stage_dir)) != REMOTE_DIR:
    p.error(f"--stage-dir must end in /{REMOTE_DIR} (scp copies it to ~/{REMOTE_DIR})")
  if args.step in ("create", "all") and not args.version:
    try:
      software_version(args.accelerator)
    except ValueError as e:
      p.error(str(e))
  return args


def main(argv: Sequence[str] | None = None) -> int:
  args = parse(sys.argv[1:] if argv is None else argv)
  if args.step in ("run", "all"):
    for w in recipe_warnings(args.config, args.override):
      print(f"warning: {w}", file=sys.stderr, flush=True)
  for build in steps(args):
    if build is build_cmd and not args.dry_run:
      shutil.rmtree(args.stage_dir, ignore_errors=True)  # one wheel, fresh configs/
      os.makedirs(args.stage_dir)
    cmd = build(args)
    print(shlex.join(cmd), flush=True)
    if not args.dry_run:
      rc = subprocess.call(cmd)
      if rc:
        print(f"error: command failed with status {rc}", file=sys.stderr)
        return rc
  return 0


if __name__ == "__main__":
  sys.exit(main())
