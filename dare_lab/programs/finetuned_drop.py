"""Program: drop *fine-tuned* parameters instead of deltas (paper §4.7, Fig. 11 and 21).

The redundancy curves with DARE and MP applied to θ_SFT itself
(``Sparsifier(target='finetuned')``): the paper finds that dropping even 10 % of θ_SFT
destroys the model, while dropping 90 % of δ does not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from dare_lab.programs import redundancy


def run(cfg: DictConfig, run_dir: Path | None = None) -> dict[str, Any]:
    return redundancy.run(cfg, run_dir, target="finetuned")
