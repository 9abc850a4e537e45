#!/usr/bin/env bash
# Paper Table 1 / GLUE merging: task arithmetic and TIES, each with and without DARE (one sweep).
#
# Usage: scripts/reproduce_table1_merge.sh [--fast] [Hydra overrides...]
#   (default)  the embedded demo pool on CPU: all-MiniLM-L6-v2 fine-tuned on the packaged
#              tweet-sentiment and BBC-news data (built and cached on first use), scored by its
#              classification taskpool. Choose other pool/taskpool configs with
#              DARE_LAB_DEMO_MODELPOOL / DARE_LAB_DEMO_TASKPOOL.
#   --fast     a tiny random BERT pool and the label-free fidelity taskpool, few points
#              (seconds; what the tests run).
#   The paper's models (GPU + internet; any HF id or local dir works):
#     HF_HUB_OFFLINE=0 TRANSFORMERS_OFFLINE=0 scripts/reproduce_table1_merge.sh modelpool=wizard_llama2_13b \
#       engine.vocab_policy=truncate taskpool=gsm8k   # WizardLM/WizardMath/code-alpaca on Llama-2-13b; or alpacaeval, humaneval, mbpp
#     HF_HUB_OFFLINE=0 TRANSFORMERS_OFFLINE=0 scripts/reproduce_table1_merge.sh modelpool=custom modelpool.base=bert-base-uncased \
#       '+modelpool.models={sst2: <your bert-base-uncased fine-tuned on SST-2>, ...}' taskpool=glue
# Results: one Hydra job per method under results/sweeps/table1_merge/<time>/, joined into
# summary.csv|md there; the script copies the joined table and a bar chart to
# results/table1_merge/<time>/. Methods: METHODS=task_arithmetic,dare_task_arithmetic,ties,dare_ties.
set -euo pipefail
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}" \
       TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}" WANDB_MODE="${WANDB_MODE:-offline}" \
       TOKENIZERS_PARALLELISM=false
PY="${PYTHON:-python}"
if [[ "${1:-}" == "--fast" ]]; then
  shift
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # tiny models: threads only add overhead
  POOL=(modelpool=tiny_bert taskpool=none '+taskpool._target_=dare_lab.analysis.fidelity.FidelityTaskPool' +taskpool.n=8)
else
  POOL=(modelpool="${DARE_LAB_DEMO_MODELPOOL:-encoder_demo}" taskpool="${DARE_LAB_DEMO_TASKPOOL:-demo}")
fi
METHODS="${METHODS:-task_arithmetic,dare_task_arithmetic,ties,dare_ties}"
STAMP="$(date +%Y-%m-%d_%H-%M-%S)-$$"
SWEEP="results/sweeps/table1_merge/${STAMP}"
"$PY" -m dare_lab.cli -m +experiment=table1_merge "${POOL[@]}" method="${METHODS}" \
  output.progress=false hydra.sweep.dir="${SWEEP}" "$@"
"$PY" - "$SWEEP" "$STAMP" <<'PYEOF'
import sys
from pathlib import Path
from dare_lab.analysis.plots import line_plot  # noqa: F401 (Agg backend)
from dare_lab.analysis.merge_table import report
report(Path(sys.argv[1]), sys.argv[2])
PYEOF
