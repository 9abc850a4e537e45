#!/usr/bin/env bash
# One entry for the paper's figures and tables: each item is configs/experiment/<item>.yaml.
#
# Usage: scripts/reproduce.sh <item> [--fast] [Hydra overrides...]     (scripts/reproduce.sh --list)
#   fig3_redundancy            Fig. 3/4/12: score vs drop rate p for DARE, DropOnly and MP (mean ± std over seeds)
#   fig8_droponly              Fig. 8: DARE vs DropOnly (same mask, no 1/(1-p) rescale)
#   fig9_magnitude             Fig. 9: DARE vs magnitude pruning (analysis.rescale_mp=true: MP + rescale)
#   fig11_finetuned_params     §4.7 / Fig. 11: DARE and MP applied to θ_SFT instead of δ
#   fig6_embedding_similarity  Fig. 6/7: per-layer cosine similarity of token embeddings, SFT vs DARE / DropOnly
#   table6_delta_ranges        Table 6 / Fig. 10, 18-20: deciles and |δ| histograms of deltas, with a verdict
#                              (the paper sampled 10 % of entries: analysis.fraction=0.1)
#   sparsifiers                beyond the paper: DARE, DropOnly, MP, DELLA, Breadcrumbs, DAREx-q vs drop rate
#   table1_merge               Table 1 / GLUE merging: task arithmetic and TIES, with and without DARE (one sweep;
#                              METHODS=task_arithmetic,dare_task_arithmetic,ties,dare_ties)
#
#   (default)  the embedded demo pool on CPU: all-MiniLM-L6-v2 fine-tuned on the packaged tweet-sentiment
#              and BBC-news data (built and cached on first use), scored by its classification taskpool.
#              Other pool/taskpool configs: DARE_LAB_DEMO_MODELPOOL / DARE_LAB_DEMO_TASKPOOL.
#   --fast     a tiny random BERT pool and the label-free fidelity taskpool, few points (seconds; what the
#              tests run).
#   The paper's models (GPU + internet; any HF id or local dir works; fig6 also wants analysis.device=cuda):
#     HF_HUB_OFFLINE=0 TRANSFORMERS_OFFLINE=0 scripts/reproduce.sh fig3_redundancy modelpool=wizard_llama2_13b \
#       engine.vocab_policy=truncate taskpool=gsm8k   # WizardLM/WizardMath/code-alpaca on Llama-2-13b; or alpacaeval, humaneval, mbpp
#     HF_HUB_OFFLINE=0 TRANSFORMERS_OFFLINE=0 scripts/reproduce.sh fig3_redundancy modelpool=custom modelpool.base=bert-base-uncased \
#       '+modelpool.models={sst2: <your bert-base-uncased fine-tuned on SST-2>, ...}' taskpool=glue
# Results: one directory per run, results/<item>/<run_name or time>/ (tables/*.csv|md, plots/*.png,
# metrics.json, config.yaml); name the run with run_name=<name>. table1_merge: one Hydra job per method
# under results/sweeps/table1_merge/<time>/ (joined in summary.csv|md there), then the table and a bar chart
# in results/table1_merge/<time>/.
set -euo pipefail
ITEMS=(fig3_redundancy fig8_droponly fig9_magnitude fig11_finetuned_params fig6_embedding_similarity
       table6_delta_ranges table1_merge sparsifiers)
usage() { echo "usage: scripts/reproduce.sh <item> [--fast] [Hydra overrides...]; items: ${ITEMS[*]}" >&2; exit 2; }
item="${1:-}"
if [[ "$item" == "--list" ]]; then printf '%s\n' "${ITEMS[@]}"; exit 0; fi
[[ " ${ITEMS[*]} " == *" $item "* ]] || usage
shift
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}" \
       TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}" WANDB_MODE="${WANDB_MODE:-offline}" \
       TOKENIZERS_PARALLELISM=false
PY="${PYTHON:-python}"
if [[ "${1:-}" == "--fast" ]]; then
  shift
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # tiny models: threads only add overhead
  POOL=(modelpool=tiny_bert taskpool=none)
  case "$item" in
    fig3_redundancy|fig8_droponly|fig9_magnitude|sparsifiers)
      POOL+=('analysis.drop_rates=[0.0,0.5,0.9]' 'analysis.seeds=[0,1]' '+analysis.fidelity={n: 8}') ;;
    fig11_finetuned_params) POOL+=('analysis.drop_rates=[0.0,0.1,0.5]' 'analysis.seeds=[0]' '+analysis.fidelity={n: 8}') ;;
    fig6_embedding_similarity) POOL+=('analysis.drop_rates=[0.0,0.5,0.9]' 'analysis.seeds=[0]' analysis.n_texts=8) ;;
    table6_delta_ranges) POOL+=(analysis.fraction=0.5) ;;
    table1_merge) POOL+=('+taskpool._target_=dare_lab.analysis.fidelity.FidelityTaskPool' +taskpool.n=8) ;;
  esac
else
  POOL=(modelpool="${DARE_LAB_DEMO_MODELPOOL:-encoder_demo}" taskpool="${DARE_LAB_DEMO_TASKPOOL:-demo}")
fi
if [[ "$item" != table1_merge ]]; then
  exec "$PY" -m dare_lab +experiment="$item" "${POOL[@]}" "$@"
fi
METHODS="${METHODS:-task_arithmetic,dare_task_arithmetic,ties,dare_ties}"
STAMP="$(date +%Y-%m-%d_%H-%M-%S)-$$"
SWEEP="results/sweeps/table1_merge/${STAMP}"
"$PY" -m dare_lab -m +experiment=table1_merge "${POOL[@]}" method="${METHODS}" \
  output.progress=false hydra.sweep.dir="${SWEEP}" "$@"
"$PY" -c 'import sys; from pathlib import Path; from dare_lab.analysis.merge_table import report; report(Path(sys.argv[1]), sys.argv[2])' \
  "$SWEEP" "$STAMP"
