#!/usr/bin/env bash
# Paper Fig. 6/7: per-layer cosine similarity of token embeddings, SFT vs DARE / DropOnly.
#
# Usage: scripts/reproduce_fig6_embedding_similarity.sh [--fast] [Hydra overrides...]
#   (default)  the embedded demo pool on CPU: all-MiniLM-L6-v2 fine-tuned on the packaged
#              tweet-sentiment and BBC-news data (built and cached on first use), scored by its
#              classification taskpool. Choose other pool/taskpool configs with
#              DARE_LAB_DEMO_MODELPOOL / DARE_LAB_DEMO_TASKPOOL.
#   --fast     a tiny random BERT pool and the label-free fidelity taskpool, few points
#              (seconds; what the tests run).
#   The paper's models (GPU + internet; any HF id or local dir works):
#     HF_HUB_OFFLINE=0 TRANSFORMERS_OFFLINE=0 scripts/reproduce_fig6_embedding_similarity.sh modelpool=wizard_llama2_13b \
#       engine.vocab_policy=truncate taskpool=gsm8k analysis.device=cuda   # WizardLM/WizardMath/code-alpaca on Llama-2-13b
#     HF_HUB_OFFLINE=0 TRANSFORMERS_OFFLINE=0 scripts/reproduce_fig6_embedding_similarity.sh modelpool=custom modelpool.base=bert-base-uncased \
#       '+modelpool.models={sst2: <your bert-base-uncased fine-tuned on SST-2>, ...}' taskpool=glue analysis.device=cuda
# Results: results/fig6_embedding_similarity/<run>/ (tables/*.csv|md, plots/*.png, metrics.json, config) and
# results/fig6_embedding_similarity/summary.csv|md; name the run with run_name=<name>.
set -euo pipefail
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}" \
       TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}" WANDB_MODE="${WANDB_MODE:-offline}" \
       TOKENIZERS_PARALLELISM=false
PY="${PYTHON:-python}"
if [[ "${1:-}" == "--fast" ]]; then
  shift
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # tiny models: threads only add overhead
  POOL=(modelpool=tiny_bert taskpool=none 'analysis.drop_rates=[0.0,0.5,0.9]' 'analysis.seeds=[0]' analysis.n_texts=8)
else
  POOL=(modelpool="${DARE_LAB_DEMO_MODELPOOL:-encoder_demo}" taskpool="${DARE_LAB_DEMO_TASKPOOL:-demo}")
fi
exec "$PY" -m dare_lab.cli +experiment=fig6_embedding_similarity "${POOL[@]}" "$@"
