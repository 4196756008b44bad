"""prefjax: preference learning for Gemma-style language models in JAX/Flax.

Submodules load on first use (PEP 562), so `import prefjax` stays cheap:

  prefjax.losses   pure preference / reward losses over per-sequence log-probs
  prefjax.ops      chunked log-probs and other numerics shared by losses and models
  prefjax.models   Gemma-family transformer, reward heads, checkpoint interop, sampler
  prefjax.data     grain pipelines for preference, unpaired, ranking and SFT data
  prefjax.sharding mesh construction and logical-axis rules
  prefjax.train    train state, the jitted train step and the loop
  prefjax.eval     reward-model and implicit-reward evaluation
"""
import importlib

__version__ = "0.1.0"

_SUBMODULES = ("losses", "ops", "models", "data", "sharding", "train", "eval", "checkpoint")


def __getattr__(name):
  if name in _SUBMODULES:
    return importlib.import_module(f"prefjax.{name}")
  raise AttributeError(f"module 'prefjax' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_SUBMODULES))
