"""launch/tpu.py --dry-run prints the gcloud commands; the Colab notebook is valid JSON."""
import json
import shlex
import subprocess
import sys

from tests.train.loop_helpers import REPO


def _dry(*args):
  r = subprocess.run([sys.executable, str(REPO / "launch" / "tpu.py"), *args, "--dry-run"],
                     capture_output=True, text=True, timeout=60)
  assert r.returncode == 0, r.stderr
  return [shlex.split(line) for line in r.stdout.strip().splitlines()]


def test_all_prints_create_install_run():
  cmds = _dry("all", "--name=pj", "--zone=us-central2-b", "--accelerator=v4-32",
              "--config=configs/dpo_gemma7b.py", "--workdir=gs://b/run",
              "--override=loss.beta=0.05")
  assert [c[4] for c in cmds] == ["create", "ssh", "ssh"]
  assert "--accelerator-type" in cmds[0] and "v4-32" in cmds[0]
  assert all("--worker=all" in c for c in cmds[1:])
  install = cmds[1][cmds[1].index("--command") + 1]
  assert "jax[tpu]==0.10.2" in install and "pip install" in install
  run = cmds[2][cmds[2].index("--command") + 1]
  assert "python3 -m prefjax.main" in run and "--config=configs/dpo_gemma7b.py" in run
  assert "--workdir=gs://b/run" in run and "--config.loss.beta=0.05" in run


def test_run_requires_workdir():
  r = subprocess.run([sys.executable, str(REPO / "launch" / "tpu.py"), "run", "--name=a",
                      "--zone=z", "--dry-run"], capture_output=True, text=True, timeout=60)
  assert r.returncode != 0 and "--workdir" in r.stderr


def test_delete():
  (cmd,) = _dry("delete", "--name=pj", "--zone=z", "--project=p")
  assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "pj"]
  assert "--project" in cmd


def test_colab_notebook_installs_and_trains_quickstart():
  nb = json.loads((REPO / "launch" / "colab_quickstart.ipynb").read_text())
  src = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
  assert "pip install" in src and "configs/quickstart.py" in src and "prefjax.main" in src
