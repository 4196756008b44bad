"""The CPU-host malloc tunable: when it is added, and that a re-exec really applies it."""
import os
import subprocess
import sys

import pytest

from prefjax import host_env

_SUPPORTED = host_env._glibc_supports_hugetlb() and host_env._thp_available()


@pytest.mark.skipif(not _SUPPORTED, reason="needs Linux, glibc >= 2.35 and transparent huge pages")
def test_tuned_env_adds_and_appends():
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
