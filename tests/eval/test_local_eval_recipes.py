"""Export / eval recipes that must work from a fresh clone (no ../shared data)."""
import os

import pytest

from configs import eval_implicit_reward, eval_reward
from prefjax.eval import tasks


@pytest.mark.parametrize("recipe", [eval_reward, eval_implicit_reward])
def test_eval_runlocal_reads_only_shipped_files(tmp_path, monkeypatch, recipe):
  monkeypatch.setenv("PREFJAX_SHARED_DATA", str(tmp_path / "empty"))
  sets = tasks.parse_sets(recipe.get_config("runlocal").eval.sets)
  assert sets
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  for name, spec in sets.items():
    assert spec is not None, f"{name} resolves through the shared data dir"
    assert spec["path"].startswith(os.path.join(repo, "prefjax", "assets")), spec
    assert os.path.exists(spec["path"]), spec
