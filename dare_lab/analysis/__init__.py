"""Analyses of the DARE paper (see docs/analysis.md).

redundancy    score vs drop rate for DARE / DropOnly / MP on δ or θ_SFT (Fig. 3, 4, 8, 9, 11, 12)
similarity    per-layer cosine similarity of hidden states, streamed (Fig. 6, 7)
delta_stats   streamed |δ| statistics, Table 6 deciles, the 0.002–0.005 verdict (Table 6, Fig. 10)
fidelity      a label-free taskpool: agreement of a model with each SFT model
merge_table   Table 1 style report of a merge sweep
plots         Agg PNGs (no pyplot state)
runner        glue for the programs in dare_lab.programs.{redundancy,finetuned_drop,
              embedding_similarity,delta_stats}
"""
