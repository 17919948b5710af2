"""Compress to an accuracy budget: an Optuna search over the compression settings.

``space`` (what a trial may change), ``trial`` (one retrain -> compress -> fine-tune, in memory),
``study`` (storage, sampler, pruner, stopping), ``budget`` (``compress_to_budget``, the library
call), ``targets`` (a shipped file's size and latency, measured per trial), ``outputs`` (best config
file, trials table, Pareto plots). ``python -m gmm_quant.tune`` wraps it
(``gmm_quant.cli.tune``). Names load on first use: importing this package imports no optuna.
"""

from gmm_quant._util.lazy import exports

_NAMES = {
    "SearchResult": "gmm_quant.search.budget",
    "compress_to_budget": "gmm_quant.search.budget",
    "DEFAULT_DIMENSIONS": "gmm_quant.search.space",
    "DEPLOY_DIMENSIONS": "gmm_quant.search.space",
    "DIMENSIONS": "gmm_quant.search.space",
    "Space": "gmm_quant.search.space",
}
__getattr__, __dir__ = exports(globals(), _NAMES)
__all__ = sorted(_NAMES)
