"""The CPU-host malloc tunable: when it is added, and that a re-exec really applies it."""
import os
import subprocess
import sys

import pytest

from prefjax import host_env

_SUPPORTED = host_env._glibc_supports_hugetlb() and host_env._thp_available()


@pytest.mark.skipif(not _SUPPORTED, reason="needs Linux, glibc >= 2.35 and transparent huge pages")
def test_tuned_env_adds_and_appends(no_accelerator_devices):
  env = host_env.tuned_env({"PATH": "/bin"})
  assert env["GLIBC_TUNABLES"] == host_env.TUNABLE and env["PATH"] == "/bin"
  env = host_env.tuned_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:" + host_env.TUNABLE


@pytest.mark.parametrize("env", [
    {host_env.OPT_OUT_VAR: "0"},
    {host_env.OPT_OUT_VAR: "off"},
    {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"},  # the user chose: leave it
    {host_env._REEXEC_MARK: "1"},  # already re-executed once: never loop
])
def test_tuned_env_leaves_alone(env):
  assert host_env.tuned_env(env) is None


def test_thp_never_means_unavailable(tmp_path):
  p = tmp_path / "enabled"
  p.write_text("always madvise [never]\n")
  assert not host_env._thp_available(str(p))
  p.write_text("always [madvise] never\n")
  assert host_env._thp_available(str(p))
  assert not host_env._thp_available(str(tmp_path / "missing"))


def _child(extra_env):
  code = ("import os, sys; from prefjax import host_env; host_env.reexec_with_tuned_malloc(); "
          "print(os.environ.get('GLIBC_TUNABLES', ''), sys.argv[1:])")
  env = {k: v for k, v in os.environ.items()
         if k not in ("GLIBC_TUNABLES", host_env._REEXEC_MARK, host_env.OPT_OUT_VAR)}
  env.update(extra_env)
  out = subprocess.run([sys.executable, "-c", code, "a", "--b=c d"], env=env, check=True,
                       capture_output=True, text=True)
  return out.stdout.strip()


@pytest.mark.skipif(not _SUPPORTED, reason="needs Linux, glibc >= 2.35 and transparent huge pages")
def test_reexec_applies_tunable_and_keeps_argv():
  assert _child({}) == f"{host_env.TUNABLE} ['a', '--b=c d']"
  assert _child({host_env.OPT_OUT_VAR: "0"}) == "['a', '--b=c d']"


@pytest.fixture
def no_accelerator_devices(monkeypatch):
  monkeypatch.setattr(host_env, "ACCELERATOR_DEVICE_GLOBS", ())


@pytest.mark.parametrize("env, reason", [
    ({"JAX_PLATFORMS": "tpu"}, "JAX_PLATFORMS=tpu"),
    ({"JAX_PLATFORMS": "tpu,cpu"}, "JAX_PLATFORMS=tpu,cpu"),
    ({"JAX_PLATFORMS": "cuda"}, "JAX_PLATFORMS=cuda"),
    ({"TPU_ACCELERATOR_TYPE": "v5litepod-16"}, "TPU_ACCELERATOR_TYPE is set"),
    ({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}, "TPU_WORKER_HOSTNAMES is set"),
])
def test_accelerator_host_from_env(no_accelerator_devices, env, reason):
  assert host_env.accelerator_host(env) == reason
  assert host_env.tuned_env(env) is None  # never tuned there, whatever the host's glibc


def test_accelerator_host_cpu(no_accelerator_devices):
  assert host_env.accelerator_host({}) is None
  assert host_env.accelerator_host({"JAX_PLATFORMS": "cpu"}) is None
  # An explicit CPU run is a CPU run, even on a TPU VM.
  assert host_env.accelerator_host({"JAX_PLATFORMS": "cpu",
                                    "TPU_ACCELERATOR_TYPE": "v4-8"}) is None


def test_accelerator_host_from_device_files(tmp_path):
  (tmp_path / "accel0").write_text("")
  globs = (str(tmp_path / "accel[0-9]*"),)
  assert host_env.accelerator_host({}, globs) == f"{tmp_path / 'accel0'} exists"
  assert host_env.accelerator_host({"JAX_PLATFORMS": "cpu"}, globs) is None
  assert host_env.accelerator_host({}, (str(tmp_path / "nvidia[0-9]*"),)) is None


def test_no_reexec_on_a_tpu_host():
  """The entry point leaves a TPU process alone (checked before glibc / THP support)."""
  assert _child({"JAX_PLATFORMS": "tpu", "TPU_ACCELERATOR_TYPE": "v5litepod-8"}) == \
      "['a', '--b=c d']"


def test_pin_cpu_platform_only_without_accelerator_or_choice():
  from prefjax import host_env  # pylint: disable=g-import-not-at-top
  env = {}
  assert host_env.pin_cpu_platform(env) == (host_env.accelerator_host({}) is None)
  env = {"JAX_PLATFORMS": "tpu"}
  assert not host_env.pin_cpu_platform(env) and env["JAX_PLATFORMS"] == "tpu"
  env = {"TPU_ACCELERATOR_TYPE": "v5litepod-8"}
  assert not host_env.pin_cpu_platform(env) and "JAX_PLATFORMS" not in env
