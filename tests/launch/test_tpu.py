"""launch/tpu.py: the commands it prints / runs, its version mapping and recipe warnings; the
Colab notebook is valid nbformat-4 JSON that installs from a wheel or a git URL."""
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import zipfile

import pytest

from tests.train.loop_helpers import REPO

TPU_PY = REPO / "launch" / "tpu.py"
JAX_TPU = "jax[tpu]==0.10.2"


def _tpu_module():
  spec = importlib.util.spec_from_file_location("launch_tpu", TPU_PY)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _invoke(*args, env=None):
  return subprocess.run([sys.executable, str(TPU_PY), *args], capture_output=True, text=True,
                        timeout=120, env=env)


def _dry(*args):
  r = _invoke(*args, "--dry-run")
  assert r.returncode == 0, r.stderr
  return [shlex.split(line) for line in r.stdout.strip().splitlines()], r.stderr


def _remote(cmd):
  assert cmd[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"], cmd
  assert "--worker=all" in cmd
  return cmd[cmd.index("--command") + 1]


POD = ("--name=pj", "--zone=us-central2-b", "--project=proj", "--accelerator=v4-32")
TRAINED = ("--override=model.init=gs://b/gemma-7b-sft", "--override=data.train=gs://b/train.jsonl")


def test_all_builds_wheel_copies_it_and_installs_it_with_jax_tpu():
  tpu = _tpu_module()
  stage = os.path.join(str(REPO), "build", "tpu", "prefjax")
  wheel = tpu.wheel_name()
  assert wheel == "prefjax-0.1.0-py3-none-any.whl"  # setup.py's version
  cmds, err = _dry("all", *POD, "--config=configs/dpo_gemma7b.py", "--workdir=gs://b/run",
                   "--override=loss.beta=0.05", *TRAINED)
  assert err == ""
  build, stage_configs, create, scp, install, run = cmds
  assert build == [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", stage, str(REPO)]
  assert stage_configs == ["cp", "-R", os.path.join(str(REPO), "configs"), stage + os.sep]
  assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pj"]
  assert create[create.index("--accelerator-type") + 1] == "v4-32"
  assert create[create.index("--version") + 1] == "tpu-ubuntu2204-base"
  assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", stage, "pj:~/",
                 "--worker=all", "--zone", "us-central2-b", "--project", "proj"]
  steps = _remote(install).split(" && ")
  assert f"prefjax/venv/bin/python -m pip install prefjax/{wheel} '{JAX_TPU}'" in steps
  assert "prefjax/venv/bin/python -m pip uninstall -q -y prefjax" in steps
  assert steps[0] == ("(test -x prefjax/venv/bin/python || (sudo apt-get -q update")
  assert "install -y -o DPkg::Lock::Timeout=600 python3.11 python3.11-venv" in steps[1]
  assert steps[2] == "python3.11 -m venv prefjax/venv))"
  assert "libtpu_releases" not in _remote(install) and "git clone" not in _remote(install)
  assert "github.com/prefjax" not in " ".join(" ".join(c) for c in cmds)
  assert _remote(run) == ("cd prefjax && venv/bin/python -m prefjax.main "
                          "--config=configs/dpo_gemma7b.py --workdir=gs://b/run "
                          "--config.loss.beta=0.05 --config.model.init=gs://b/gemma-7b-sft "
                          "--config.data.train=gs://b/train.jsonl")


def test_install_with_repo_builds_no_wheel():
  cmds, _ = _dry("install", *POD, "--repo=git+https://github.com/me/prefjax.git@dev")
  (install,) = cmds  # no pip wheel, no cp, no scp
  remote = _remote(install)
  assert remote.startswith("(test -d prefjax/.git || (git clone -q https://github.com/me/prefjax"
                           ".git prefjax && git -C prefjax checkout -q dev))")
  assert (f"prefjax/venv/bin/python -m pip install git+https://github.com/me/prefjax.git@dev "
          f"'{JAX_TPU}'") in remote.split(" && ")
  assert ".whl" not in remote
  cmds, _ = _dry("install", *POD, "--repo=prefjax==0.1.0")  # any pip requirement: no clone
  assert "git clone" not in _remote(cmds[0])
  assert f"prefjax/venv/bin/python -m pip install prefjax==0.1.0 '{JAX_TPU}'" in _remote(cmds[0])


@pytest.mark.parametrize("accelerator,version", [
    ("v4-8", "tpu-ubuntu2204-base"), ("v4-32", "tpu-ubuntu2204-base"),
    ("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v5e-8", "v2-alpha-tpuv5-lite"),
    ("v5p-8", "v2-alpha-tpuv5"), ("v6e-8", "v2-alpha-tpuv6e"), ("V6E-256", "v2-alpha-tpuv6e")])
def test_software_version_per_generation(accelerator, version):
  assert _tpu_module().software_version(accelerator) == version
  (create,), _ = _dry("create", "--name=a", "--zone=z", f"--accelerator={accelerator}")
  assert create[create.index("--version") + 1] == version


def test_version_flag_overrides_and_unknown_generation_is_an_error():
  (create,), _ = _dry("create", "--name=a", "--zone=z", "--accelerator=v6e-8",
                      "--version=v2-alpha-tpuv6e-custom")
  assert create[create.index("--version") + 1] == "v2-alpha-tpuv6e-custom"
  r = _invoke("create", "--name=a", "--zone=z", "--accelerator=tpu7x-8", "--dry-run")
  assert r.returncode != 0 and "--version" in r.stderr and r.stdout == ""


def test_warns_about_unset_model_init_and_shipped_data():
  _, err = _dry("run", "--name=a", "--zone=z", "--config=configs/dpo_gemma7b.py",
                "--workdir=gs://b/run", "--override=loss.beta=0.05")
  assert "warning: configs/dpo_gemma7b.py: model.init is unset" in err
  assert "warning: configs/dpo_gemma7b.py: data.train is the small HH-RLHF sample" in err
  _, err = _dry("run", "--name=a", "--zone=z", "--config=configs/dpo_gemma7b.py",
                "--workdir=gs://b/run", "--override=model.init=gs://b/ckpt")
  assert "model.init" not in err and "data.train is the small" in err
  _, err = _dry("all", "--name=a", "--zone=z", "--config=configs/dpo_gemma7b.py",
                "--workdir=gs://b/run", *TRAINED)
  assert err == ""
  _, err = _dry("install", "--name=a", "--zone=z", "--config=configs/dpo_gemma7b.py")
  assert err == ""  # only run / all look at the recipe


def test_recipe_arg_is_passed_to_get_config():
  c = _tpu_module().load_recipe("configs/dpo_gemma7b.py:runlocal", ["model.init=gs://x"])
  assert c.model.preset == "tiny_gemma" and c.model.init == "gs://x"


def test_install_really_builds_the_wheel_and_stages_configs(tmp_path):
  """Without --dry-run, with a fake gcloud that records its arguments."""
  log = tmp_path / "gcloud.log"
  fake = tmp_path / "bin" / "gcloud"
  fake.parent.mkdir()
  fake.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$*\" >> {log}\n")
  fake.chmod(0o755)
  stage = tmp_path / "stage" / "prefjax"
  env = dict(os.environ, PATH=f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
  had_build = (REPO / "build").exists()
  try:
    r = _invoke("install", "--name=pj", "--zone=z", f"--stage-dir={stage}", env=env)
  finally:
    if not had_build:  # setuptools' in-tree build/ folder
      shutil.rmtree(REPO / "build", ignore_errors=True)
  assert r.returncode == 0, r.stderr
  wheel = stage / _tpu_module().wheel_name()
  assert wheel.is_file() and (stage / "configs" / "dpo_gemma7b.py").is_file()
  names = zipfile.ZipFile(wheel).namelist()
  assert "prefjax/main.py" in names and "prefjax/assets/tokenizers/mistral_v1/tokenizer.model" in names
  scp, ssh = log.read_text().splitlines()
  assert scp.startswith(f"compute tpus tpu-vm scp --recurse {stage} pj:~/ --worker=all")
  assert f"pip install prefjax/{wheel.name} '{JAX_TPU}'" in ssh


def test_stage_dir_must_end_in_prefjax():
  r = _invoke("install", "--name=a", "--zone=z", "--stage-dir=/tmp/x", "--dry-run")
  assert r.returncode != 0 and "--stage-dir" in r.stderr


def test_run_requires_workdir():
  r = _invoke("run", "--name=a", "--zone=z", "--dry-run")
  assert r.returncode != 0 and "--workdir" in r.stderr


def test_delete():
  (cmd,), _ = _dry("delete", "--name=pj", "--zone=z", "--project=p")
  assert cmd == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "pj", "--zone", "z",
                 "--project", "p", "--quiet"]


def test_colab_notebook_installs_from_wheel_or_git_url_and_trains_quickstart():
  text = (REPO / "launch" / "colab_quickstart.ipynb").read_text()
  nb = json.loads(text)
  assert nb["nbformat"] == 4 and isinstance(nb["nbformat_minor"], int)
  for c in nb["cells"]:
    assert c["cell_type"] in ("markdown", "code") and isinstance(c["source"], list)
    if c["cell_type"] == "code":
      assert c["outputs"] == [] and "execution_count" in c
  assert "github.com/prefjax" not in text and "libtpu_releases" not in text
  code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
  md = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
  assert 'GIT_URL = ""  # @param {type:"string"}' in code
  assert "files.upload()" in code and ".whl" in code and JAX_TPU in code
  assert "configs/quickstart.py" in code and "prefjax.main" in code
  assert "25–43 s" in md and "10 CPU-minutes" in md  # the README's quick-start timings
  for c in nb["cells"]:  # the Python parts compile (IPython ! / % lines dropped)
    if c["cell_type"] == "code":
      src = "".join(l for l in c["source"] if not l.lstrip().startswith(("!", "%")))
      compile(src, "cell", "exec")
