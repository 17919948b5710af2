"""Compress to an accuracy budget: an Optuna search over the compression settings.

``space`` (what a trial may change), ``trial`` (one retrain -> compress -> fine-tune, in memory),
``study`` (storage, sampler, pruner, stopping), ``budget`` (``compress_to_budget``, the library
call), ``outputs`` (best config file, trials table, Pareto plot). ``python -m gmm_quant.tune`` wraps it.
"""

from gmm_quant.search.budget import SearchResult, compress_to_budget
from gmm_quant.search.space import DEFAULT_DIMENSIONS, DIMENSIONS, Space

__all__ = ["DEFAULT_DIMENSIONS", "DIMENSIONS", "SearchResult", "Space", "compress_to_budget"]
