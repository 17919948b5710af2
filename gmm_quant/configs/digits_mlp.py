"""Quick default: a 64-256-128-10 MLP on scikit-learn's bundled 8x8 digits (no download).

Command:  python -m gmm_quant.train --config digits_mlp --workdir runs/digits
Runtime:  about 1 minute on 2 CPU cores.
Expected: test error about 1-2% before and after; about 95% of the weights exactly zero.
"""

from gmm_quant.config import Config


def get_config() -> Config:
    return Config(model="digits_mlp", dataset="digits")
