#!/usr/bin/env bash
# Reproduction of Lin et al. 2024 ("On the Limited Generalization Capability of the Implicit
# Reward Model Induced by Direct Preference Optimization") with prefjax, offline, on CPU/TPU.
#
#   1. SFT a tiny Gemma-style model on HH helpful-base text (shipped file + 32k tokenizer),
#      80% side of the hash split (the other 20% is never trained on)
#   2. from that SFT backbone: an explicit Bradley–Terry RM and a DPO policy, same 80%
#   3. eval_implicit_reward: DPO implicit reward vs explicit RM on the held-out 20% (ID),
#      the other HH-RLHF test splits (ID) and every OOD set; ID−OOD drop
#   4. iterative DPO (Alg. 1), 2 iterations, annotated by the explicit RM / by the DPO
#      implicit reward
#   5. generate: SFT and both iterative policies on held-out prompts, scored by the RM
#
# Usage (from the repository root):  bash scripts/reproduce_lin2024.sh
# Sizes come from the environment; SHORT=1 gives a minutes-long smoke version:
#   W=/tmp/lin2024 SFT_STEPS=1000 RM_STEPS=600 DPO_STEPS=600 ITER_STEPS=100 bash scripts/reproduce_lin2024.sh
#   SHORT=1 W=/tmp/lin2024_short bash scripts/reproduce_lin2024.sh
#   SEEDS="0 1 2" ...   RM + DPO + eval once per seed; the table gives mean ± std over seeds
# Every step resumes when re-run (same command). PARALLEL=1 runs the independent steps
# (RM and DPO; eval and the two iterative runs) concurrently.
set -euo pipefail

# Runs "$@" in the background when PARALLEL=1 (collected by `join`), else now.
PIDS=()
step() { if [[ "${PARALLEL:-0}" == 1 ]]; then "$@" & PIDS+=($!); else "$@"; fi; }
join() { local p; for p in "${PIDS[@]}"; do wait "$p"; done; PIDS=(); }

W=${W:-/tmp/lin2024}
D=${D:-prefjax/assets/data/hh_rlhf_helpful_base/test.jsonl.gz}  # HH-RLHF helpful-base (2,354 pairs)
MAIN=${MAIN:-python -m prefjax.main}
if [[ "${SHORT:-0}" == 1 ]]; then
  SFT_STEPS=${SFT_STEPS:-150}; RM_STEPS=${RM_STEPS:-100}; DPO_STEPS=${DPO_STEPS:-100}
  ITER_STEPS=${ITER_STEPS:-10}; NUM_PROMPTS=${NUM_PROMPTS:-32}; K=${K:-4}
  EVAL_SETS=${EVAL_SETS:-"hh_heldout=$D|eval,hh_helpful_online,hhh_alignment,llmbar_natural,llmbar_faireval,mtbench_human"}
  GEN_PROMPTS=${GEN_PROMPTS:-16}; NEW_TOKENS=${NEW_TOKENS:-32}
else
  SFT_STEPS=${SFT_STEPS:-1000}; RM_STEPS=${RM_STEPS:-600}; DPO_STEPS=${DPO_STEPS:-600}
  ITER_STEPS=${ITER_STEPS:-100}; NUM_PROMPTS=${NUM_PROMPTS:-512}; K=${K:-4}
  EVAL_SETS=${EVAL_SETS:-"hh_heldout=$D|eval,hh_harmless_base,hh_helpful_online,hh_helpful_rejection_sampled,ood"}
  GEN_PROMPTS=${GEN_PROMPTS:-128}; NEW_TOKENS=${NEW_TOKENS:-64}
fi
# Learning rates of the RM and DPO runs from the SFT model (quick-start model, batch 32 / 16):
# about 1-2 epochs over the 80% side; longer or faster runs overfit the ~1.9k pairs (the
# held-out accuracy of a 300-step RM run at 3e-4 peaked at step 60 and fell to chance).
RM_LR=${RM_LR:-3e-4}; DPO_LR=${DPO_LR:-1e-4}
DATA=(--config.data.train="$D" --config.data.split_fraction=0.8 --config.log.progress=False)
mkdir -p "$W"

echo "== 1. SFT ($SFT_STEPS steps) on the 80% side of $D"
$MAIN --config=configs/quickstart.py --workdir="$W/sft" "${DATA[@]}" \
  --config.task=sft --config.reference.mode=none --config.total_steps="$SFT_STEPS" \
  --config.optim.learning_rate=1e-3 --config.eval.num_batches=4 --config.ckpt.every_steps=100

# Seeds: each seed trains its own RM and DPO policy from the same SFT backbone (config.seed
# sets the reward-head init and the data order) and evaluates them; iterative DPO and the
# generations use the first seed's models.
SEEDS=${SEEDS:-0}
read -r -a SEED_LIST <<< "$SEEDS"
S0=${SEED_LIST[0]}
for S in "${SEED_LIST[@]}"; do
  echo "== 2a. [seed $S] explicit Bradley-Terry RM ($RM_STEPS steps) from the SFT model"
  step $MAIN --config=configs/quickstart.py:rm --workdir="$W/seed$S/rm" "${DATA[@]}" \
    --config.seed="$S" --config.model.init="$W/sft" --config.total_steps="$RM_STEPS" \
    --config.optim.learning_rate="$RM_LR" --config.eval.num_batches=8

  echo "== 2b. [seed $S] DPO (beta 0.1, $DPO_STEPS steps) from the SFT model, reference = SFT model"
  step $MAIN --config=configs/quickstart.py --workdir="$W/seed$S/dpo" "${DATA[@]}" \
    --config.seed="$S" --config.model.init="$W/sft" --config.total_steps="$DPO_STEPS" \
    --config.loss.beta=0.1 --config.optim.learning_rate="$DPO_LR" --config.eval.num_batches=8
  join
done

for S in "${SEED_LIST[@]}"; do
  echo "== 3. [seed $S] implicit (DPO) vs explicit RM: $EVAL_SETS"
  step $MAIN --config=configs/eval_implicit_reward.py --workdir="$W/seed$S/eval" \
    --config.data.split_fraction=0.8 --config.log.progress=False \
    --config.model.init="$W/seed$S/dpo" --config.eval.reward_model="$W/seed$S/rm" \
    --config.eval.sets="$EVAL_SETS"
done
join

for KIND in explicit implicit; do
  if [[ $KIND == explicit ]]; then ANN="$W/seed$S0/rm"; else ANN="$W/seed$S0/dpo"; fi
  echo "== 4. iterative DPO, annotator = $KIND ($ANN), 2 iterations x $ITER_STEPS steps, K=$K"
  step $MAIN --config=configs/iterative_dpo.py --workdir="$W/iter_$KIND" "${DATA[@]}" \
    --config.model.init="$W/sft" --config.annotator.kind=$KIND --config.annotator.path="$ANN" \
    --config.iterative.num_iterations=2 --config.total_steps="$ITER_STEPS" \
    --config.iterative.num_prompts="$NUM_PROMPTS" --config.sample.num_samples="$K" \
    --config.sample.max_new_tokens="$NEW_TOKENS"
done
join

echo "== 5. generations on held-out prompts, scored by the explicit RM (seed $S0)"
$MAIN --config=configs/generate.py --workdir="$W/generate" "${DATA[@]}" \
  --config.generate.policies="sft=$W/sft,iter_explicit=$W/iter_explicit/iter_2,iter_implicit=$W/iter_implicit/iter_2" \
  --config.generate.reward_model="$W/seed$S0/rm" --config.generate.split=eval \
  --config.generate.num_prompts="$GEN_PROMPTS" --config.sample.max_new_tokens="$NEW_TOKENS" \
  --config.sample.num_samples=2

echo "== summary (Markdown; also written to $W/summary.md)"
python scripts/lin2024_table.py "$W" | tee "$W/summary.md"
