"""Data-aware merges: streamed Fisher/Gram statistics and the Fisher/RegMean merge driver."""

from dare_lab.data_aware.merge import DataAwareMerge, fisher, regmean
from dare_lab.data_aware.statistics import fisher_diagonal, gram_matrices

__all__ = ["DataAwareMerge", "fisher", "regmean", "fisher_diagonal", "gram_matrices"]
