"""``python -m gmm_quant.tune``: compress to an accuracy budget (an Optuna search).

The command itself is ``gmm_quant.cli.tune``.
"""

from gmm_quant.cli.common import exit_now
from gmm_quant.cli.tune import main

if __name__ == "__main__":
    exit_now(main())
