"""The CLI: config-key errors, unknown tasks and validation messages, without tracebacks."""
import re
import pytest

from tests.train import loop_helpers as lh


def test_unknown_config_key_names_the_key(tmp_path):
  r = lh.run_main(str(tmp_path), ["--config.optim.learning_rat=1e-3"])
  assert r.returncode != 0
  assert "learning_rat" in r.stderr
  assert "Traceback" not in r.stderr


def test_unknown_task_lists_tasks(tmp_path):
  r = lh.run_main(str(tmp_path), ["--config.task=dpo_magic"])
  assert r.returncode == 2
  assert "unknown config.task 'dpo_magic'" in r.stderr and "preference" in r.stderr
  assert "iterative_dpo" in r.stderr and "Traceback" not in r.stderr


def test_validation_error_is_one_line(tmp_path):
  r = lh.run_main(str(tmp_path), ["--config.data.batch_size=7"])
  assert r.returncode == 2
  assert "config.data.batch_size=7" in r.stderr and "Traceback" not in r.stderr


def test_missing_workdir_is_a_usage_error():
  r = lh.run_main("", [])
  assert r.returncode != 0 and "workdir" in r.stderr


@pytest.mark.parametrize("overrides,needle", [
    ({"loss.name": "dpoo"}, "unknown config.loss.name 'dpoo'"),
    ({"reference.mode": "none"}, "needs reference log-probs"),
    ({"loss.name": "simpo", "reference.mode": "model"}, "reference-free"),
    ({"optim.grad_accum_steps": 3}, "divisible by grad_accum_steps"),
    ({"optim.schedule": "cosin"}, "optim.schedule"),
    ({"kernels.cpu_scheduler": "fast"}, "config.kernels.cpu_scheduler='fast'"),
    ({"kernels.logps_implementation": "fused"}, "config.kernels.logps_implementation='fused'"),
    ({"kernels.attention": "flash"}, "config.kernels.attention='flash'"),
    ({"kernels.attention_key_tile": -64}, "config.kernels.attention_key_tile=-64 must be >= 0"),
    ({"train.cpu_scheduler": "memory_optimized"},
     "config.train.cpu_scheduler is now config.kernels.cpu_scheduler"),
    ({"mesh.fsdp": 3}, "config.mesh"),
    ({"loss.beta": 0.0}, "config.loss.beta=0.0 must be > 0 (loss 'dpo')"),
    ({"loss.beta": -0.1}, "config.loss.beta=-0.1 must be > 0"),
    ({"loss.beta": float("nan")}, "config.loss.beta=nan must be a finite number"),
    ({"loss.label_smoothing": 0.7}, "config.loss.label_smoothing=0.7 must be >= 0 and <= 0.5"),
    ({"ckpt.every_steps": -1}, "config.ckpt.every_steps=-1 must be >= 0"),
    ({"eval.every_steps": -5}, "config.eval.every_steps=-5 must be >= 0"),
])
def test_validate_messages(overrides, needle):
  from configs import quickstart  # pylint: disable=g-import-not-at-top
  from prefjax.train import validation  # pylint: disable=g-import-not-at-top
  c = quickstart.get_config("runlocal")
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  with pytest.raises(validation.ConfigError, match=re.escape(needle)):
    validation.validate(c)


def test_unknown_loss_hyperparameter_is_named():
  from configs import quickstart  # pylint: disable=g-import-not-at-top
  from prefjax.train import validation  # pylint: disable=g-import-not-at-top
  c = quickstart.get_config("runlocal")
  c.loss.simpo_gamma = 0.5  # not a DPO hyperparameter
  with pytest.raises(validation.ConfigError, match="config.loss.simpo_gamma"):
    validation.validate(c)


def test_compilation_cache_dir_is_filled_and_reused(tmp_path):
  """train.compilation_cache_dir turns on JAX's persistent cache: the first run writes the
  compiled train step there, a second run with the same shapes finds it (no new train-step
  entry).

  Only programs that took >= 1 s to compile are written, so under load a small helper program
  can cross that line in the second run and add an entry of its own; the train step is the
  program the cache exists for, and it must not be compiled again."""
  data = lh.write_pairs(tmp_path / "pairs.jsonl", n=32)
  cache = tmp_path / "xla_cache"
  args = lh.overrides(data, total_steps=2, **{"train.compilation_cache_dir": str(cache),
                                               "eval.every_steps": 0})
  r = lh.run_main(str(tmp_path / "a"), args)
  assert r.returncode == 0, r.stderr[-3000:]
  first = set(p.name for p in cache.iterdir())
  assert first, "nothing was written to the compilation cache"
  r = lh.run_main(str(tmp_path / "b"), args)
  assert r.returncode == 0, r.stderr[-3000:]
  second = set(p.name for p in cache.iterdir())
  assert first <= second, f"entries of the first run disappeared: {first - second}"
  train_steps = lambda names: {n for n in names if n.startswith("jit_train_step")}
  assert train_steps(first), f"the train step was not cached: {sorted(first)}"
  assert train_steps(second) == train_steps(first), (
      f"the second run compiled the train step again: {sorted(second - first)}")


def test_cli_kernel_overrides_reach_the_model(monkeypatch):
  """`--config.kernels.*` on the command line become the run's `Kernels` (the mesh platform's
  defaults with the keys set) and reach the model's attention through the programs' task."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from prefjax.models import Kernels, layers  # pylint: disable=g-import-not-at-top
  from prefjax.train import builders, program  # pylint: disable=g-import-not-at-top
  from tests.train import helpers  # pylint: disable=g-import-not-at-top
  argv = ["prefjax", f"--config={lh.REPO / 'configs' / 'quickstart.py'}:runlocal",
          "--config.kernels.attention_key_tile=64", "--config.kernels.attention_causal_block=16",
          "--config.kernels.attention_query_block=32",
          "--config.kernels.logps_implementation=saved_logits"]
  fv = flags.FlagValues()  # as prefjax.main defines it, on this argv
  config_flags.DEFINE_config_file("config", None, "recipe", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  config = fv.config
  mesh, rules = builders.make_mesh(config)
  kernels = builders.kernels_for_mesh(config, mesh)
  assert kernels == Kernels.for_platform(
      "cpu", attention_key_tile=64, attention_causal_block=16, attention_query_block=32,
      logps_implementation="saved_logits")
  assert kernels.cpu_scheduler == "memory_optimized"  # unset: the platform's default
  key_tiles = []
  window = layers.window_flash_attention
  monkeypatch.setattr(layers, "window_flash_attention",
                      lambda *a: key_tiles.append(a[6]) or window(*a))
  with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
    model_cfg = builders.model_config(config.model, task=config.task)
    progs = program.build(config, mesh, rules, model_cfg, total_steps=2)
    assert progs.kernels == kernels and progs.head.implementation == "saved_logits"
    batch = helpers.pair_batch(8, length=64)
    jax.eval_shape(progs.task.loss_fn, progs.abstract_params, None,
                   dict(batch, ref_logps=batch["tokens"][:, :, 0].astype("float32")))
  assert key_tiles and set(key_tiles) == {64}


def test_tokenizer_larger_than_the_model_vocabulary_is_one_line(tmp_path):
  """Token ids >= the model's vocabulary would read past the embedding and surface as a NaN
  loss at step 1; the run refuses before the first step, naming both sizes."""
  r = lh.run_main(str(tmp_path / "wd"), ["--config.model.vocab_size=1000"])
  assert r.returncode == 2, r.stderr[-2000:]
  assert ("data.tokenizer='mistral_v1' has 32000 pieces but the model's vocabulary has 1000 "
          "rows") in r.stderr
  assert "Traceback" not in r.stderr
  assert not (tmp_path / "wd" / "metrics.jsonl").exists()


def test_help_exits_zero_with_the_flags():
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  r = subprocess.run([sys.executable, "-m", "prefjax.main", "--help"], cwd=str(lh.REPO),
                     capture_output=True, text=True, timeout=120, check=False)
  assert r.returncode == 0 and "--workdir" in r.stdout and "resumes" in r.stdout


def test_missing_config_file_is_one_line(tmp_path):
  r = lh.run_main(str(tmp_path / "wd"), [], config="configs/no_such_recipe.py")
  assert r.returncode == 2
  assert r.stderr.strip() == ("error: cannot load --config=configs/no_such_recipe.py: [Errno 2] "
                              "No such file or directory: 'configs/no_such_recipe.py'")
