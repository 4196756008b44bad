r"""Iterative DPO (Lin et al. 2024, Alg. 1) with an explicit-RM or implicit-reward annotator.

For t = 1..T: K samples per prompt from π_{t-1}, scored by the annotator (an explicit
Bradley–Terry RM, or the implicit reward β·log π/π_ref of a DPO policy), best vs worst as a
preference pair (ties skipped), then DPO from π_{t-1} on those pairs. Everything is kept under
`<workdir>/iter_{t}/`; per-iteration annotator reward, KL-to-π_0 estimate and response length
go to `<workdir>/iterative_metrics.jsonl`. Re-running the command resumes.

  python -m prefjax.main --config=configs/iterative_dpo.py --workdir=/tmp/iter_explicit \
      --config.model.init=/tmp/sft --config.annotator.kind=explicit --config.annotator.path=/tmp/rm
  python -m prefjax.main --config=configs/iterative_dpo.py --workdir=/tmp/iter_implicit \
      --config.model.init=/tmp/sft --config.annotator.kind=implicit --config.annotator.path=/tmp/dpo
  python -m prefjax.main --config=configs/iterative_dpo.py:runlocal --workdir=/tmp/iter_local \
      --config.model.init=/tmp/sft --config.annotator.path=/tmp/rm
"""
import os
import sys

from ml_collections.config_dict import placeholder

try:
  from configs import common
  from configs import eval_reward
  from configs import generate
except ImportError:  # run from outside the repository root
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import common
  from configs import eval_reward
  from configs import generate


def get_config(arg=None):
  """Iterative DPO on the quick-start model size; `runlocal`: 8 prompts, K=2, 2 steps per iteration."""
  a = common.parse_arg(arg, runlocal=False)
  c = common.base_config()
  c.task = "iterative_dpo"
  c.model.preset = "tiny_gemma"  # architecture of model.init (read from its workdir when it is one)
  c.model.vocab_size = 32_000  # the shipped mistral_v1 tokenizer
  c.model.embed_dim = 64  # quickstart size
  c.model.num_layers = 2  # quickstart size
  c.model.num_heads = 4  # quickstart size
  c.model.num_kv_heads = 1  # quickstart size
  c.model.head_dim = 16  # quickstart size
  c.model.hidden_dim = 256  # quickstart size
  c.model.init = placeholder(str)  # π_0: the SFT policy (prefjax workdir or HF dir; required)
  c.loss.name = "dpo"  # the loss of every iteration
  c.loss.beta = 0.1  # DPO β (Lin et al. 2024 use 0.1)
  c.reference.mode = "model"  # live frozen reference (the per-iteration data is small)
  c.total_steps = 100  # DPO steps per iteration
  c.optim.learning_rate = 1e-4  # per-iteration DPO learning rate
  c.optim.warmup_steps = 0  # no warmup inside an iteration
  eval_reward.local_data(c)
  c.data.batch_size = 16  # DPO pairs per step
  c.data.split_fraction = 0.8  # prompts come from the 80% train side (iterative.prompt_split)
  c.ckpt.every_steps = 50  # checkpoints inside an iteration's run
  c.log.every_steps = 10  # metrics.jsonl interval of an iteration's run

  c.iterative = type(c)()
  c.iterative.num_iterations = 2  # T
  c.iterative.prompts = placeholder(str)  # prompt file(s) (None: data.train)
  c.iterative.prompt_split = "train"  # train | eval side of data.split_fraction; "": all
  c.iterative.num_prompts = 512  # first N unique prompts (0: all)
  c.iterative.split_prompts = False  # True: a disjoint 1/T of the prompts per iteration
  c.iterative.reference = "initial"  # DPO reference of every iteration: initial (π_0) | previous (π_{t-1})
  c.iterative.final_eval = True  # also sample and score π_T (row "final" of iterative_metrics.jsonl)
  c.iterative.stop_after = 0  # stop after this many iterations (0: run all T)

  c.annotator = type(c)()
  c.annotator.kind = "explicit"  # explicit: reward model | implicit: DPO policy's implicit reward
  c.annotator.path = placeholder(str)  # the RM or DPO policy (prefjax workdir or HF dir; required)
  c.annotator.reference = placeholder(str)  # implicit: the DPO policy's reference (None: from its workdir)
  c.annotator.method = placeholder(str)  # implicit: reward definition (None: the DPO run's loss.name)
  c.annotator.beta = placeholder(float)  # implicit: β (None: the DPO run's loss.beta)

  generate.add_sample_keys(c, num_samples=4, max_new_tokens=64, batch_size=32)
  if a.runlocal:
    common.runlocal(c)
    eval_reward.local_data(c)
    c.data.batch_size = 8
    c.iterative.num_prompts = 8
    c.sample.num_samples = 2
    c.sample.max_new_tokens = 16
    c.sample.batch_size = 16
  return c
