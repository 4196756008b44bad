"""Reward-model and implicit-reward evaluation (explicit RM vs DPO-family implicit RM).

  metrics   accuracy (score ties 0.5), reward mean/std/margin, length buckets, bootstrap CI,
            ID/OOD means and drop                                      (numpy, pure)
  implicit  implicit rewards from sequence log-probs: DPO family, SimPO, CPO, ORPO, RRHF (jnp)
  scoring   score_pairs_fns from a model: reward head at the last token (explicit RM), or a
            policy's implicit reward from chunked sequence log-probs (any pair layout)
  registry  named eval sets in shared/data (path + format + ID/OOD tag)
  runner    score_batches / evaluate_sets over pair batches (masked padded last batch),
            pipeline_batches (prefjax.data eval iterators for registered sets),
            evaluate_and_report (JSON + Markdown + HTML + PNGs)
  report    eval_results.{json,md,html}, explicit-vs-implicit comparison table
  plots     score histograms, accuracy bars, length buckets, generation scores (PNG; loaded
            lazily: `from prefjax.eval import plots`)
  cases     generation score summaries and the case-study table of two policies
"""
from prefjax.eval import cases, implicit, metrics, registry, report, runner, scoring
from prefjax.eval.implicit import implicit_pair_rewards, implicit_reward, score_fn_from_logps
from prefjax.eval.metrics import (accuracy, accuracy_drop, bootstrap_accuracy_ci,
                                  id_ood_summary, length_bias, pair_metrics, reward_stats)
from prefjax.eval.registry import EVAL_SETS, ID_SETS, OOD_SETS, default_shared_data_dir
from prefjax.eval.runner import (ScoredPairs, SetResult, evaluate_and_report, evaluate_kinds,
                                 evaluate_registered, evaluate_sets, load_scores,
                                 pipeline_batches, rerender,
                                 registry_sources, score_batches)
from prefjax.eval.scoring import implicit_score_fn, reward_score_fn
from prefjax.eval.report import write_report
