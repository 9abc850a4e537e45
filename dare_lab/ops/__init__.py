"""Pure tensor math: sparsifiers, mergers and per-tensor seeding (no I/O, no config)."""

from dare_lab.ops.merge import average, task_arithmetic, ties, ties_disjoint_merge, ties_elect, ties_trim
from dare_lab.ops.method import MergeMethod, Merger, Sparsifier
from dare_lab.ops.seeding import tensor_generator, tensor_seed
from dare_lab.ops.sparsify import (
    breadcrumbs,
    check_drop_rate,
    dare,
    darex,
    darex_auto_q,
    della,
    della_drop_probabilities,
    drop_only,
    keep_count,
    keep_mask,
    magnitude_prune,
    top_magnitude_mask,
)

__all__ = [
    "average", "task_arithmetic", "ties", "ties_trim", "ties_elect", "ties_disjoint_merge",
    "MergeMethod", "Merger", "Sparsifier", "tensor_generator", "tensor_seed",
    "check_drop_rate", "dare", "drop_only", "keep_count", "keep_mask", "magnitude_prune",
    "top_magnitude_mask", "della", "della_drop_probabilities", "breadcrumbs", "darex", "darex_auto_q",
]
