r"""Create a TPU VM / pod slice, install prefjax on every worker, run a recipe on all workers.

  python launch/tpu.py all --name=pj-v4 --zone=us-central2-b --accelerator=v4-32 \
      --config=configs/dpo_gemma7b.py --workdir=gs://BUCKET/runs/dpo7b \
      --override=loss.beta=0.05 --dry-run

Steps (each also a subcommand): `create` (gcloud compute tpus tpu-vm create), `install`
(pip install jax[tpu] and prefjax from --repo on every worker), `run` (the same
`python -m prefjax.main` command on all workers, `--worker=all`: jax.distributed initialises
itself on a pod), `delete`. `--dry-run` prints the gcloud commands without running them.
Re-running `run` resumes from the workdir's last checkpoint.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from typing import Sequence

JAX_VERSION = "0.10.2"
DEFAULT_REPO = "git+https://github.com/prefjax/prefjax.git"


def _base(args: argparse.Namespace) -> list[str]:
  out = ["--zone", args.zone]
  if args.project:
    out += ["--project", args.project]
  return out


def create_cmd(args: argparse.Namespace) -> list[str]:
  cmd = ["gcloud", "compute", "tpus", "tpu-vm", "create", args.name, *_base(args),
         "--accelerator-type", args.accelerator, "--version", args.version]
  if args.spot:
    cmd.append("--spot")
  return cmd


def ssh_cmd(args: argparse.Namespace, remote: str) -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.name, *_base(args),
          "--worker=all", "--command", remote]


def install_cmd(args: argparse.Namespace) -> list[str]:
  remote = " && ".join([
      "python3 -m pip install -U pip",
      f"python3 -m pip install 'jax[tpu]=={JAX_VERSION}' "
      "-f https://storage.googleapis.com/jax-releases/libtpu_releases.html",
      f"python3 -m pip install {shlex.quote(args.repo)}",
      f"(test -d prefjax || git clone {shlex.quote(args.repo.removeprefix('git+'))} prefjax)",
  ])
  return ssh_cmd(args, remote)


def run_remote(args: argparse.Namespace) -> str:
  flags = [f"--config={args.config}", f"--workdir={args.workdir}"]
  flags += [f"--config.{o}" for o in args.override]
  main = "python3 -m prefjax.main " + " ".join(shlex.quote(f) for f in flags)
  log = "$HOME/prefjax_run.log"
  return f"cd prefjax && nohup {main} > {log} 2>&1 &" if args.detach else f"cd prefjax && {main}"


def run_cmd(args: argparse.Namespace) -> list[str]:
  return ssh_cmd(args, run_remote(args))


def delete_cmd(args: argparse.Namespace) -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "delete", args.name, *_base(args), "--quiet"]


STEPS = {"create": [create_cmd], "install": [install_cmd], "run": [run_cmd],
         "delete": [delete_cmd], "all": [create_cmd, install_cmd, run_cmd]}


def parse(argv: Sequence[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("step", choices=sorted(STEPS))
  p.add_argument("--name", required=True, help="TPU VM name")
  p.add_argument("--zone", required=True, help="e.g. us-central2-b")
  p.add_argument("--project", default=None, help="GCP project (default: gcloud's)")
  p.add_argument("--accelerator", default="v4-8", help="v4-8, v4-32, v5litepod-16, ...")
  p.add_argument("--version", default="tpu-ubuntu2204-base", help="TPU VM runtime version")
  p.add_argument("--spot", action="store_true", help="spot / preemptible capacity")
  p.add_argument("--repo", default=DEFAULT_REPO, help="pip-installable prefjax source")
  p.add_argument("--config", default="configs/quickstart.py", help="recipe[:arg]")
  p.add_argument("--workdir", default=None, help="run directory (gs:// on pods)")
  p.add_argument("--override", action="append", default=[], help="key=value (repeatable)")
  p.add_argument("--detach", action="store_true", help="run in the background (nohup)")
  p.add_argument("--dry-run", action="store_true", help="print the commands only")
  args = p.parse_args(argv)
  if args.step in ("run", "all") and not args.workdir:
    p.error("--workdir is required for run / all")
  return args


def main(argv: Sequence[str] | None = None) -> int:
  args = parse(sys.argv[1:] if argv is None else argv)
  for build in STEPS[args.step]:
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
