"""``python -m gmm_quant.train``: pretrain, retrain with the prior, compress, fine-tune, save, export.

The command itself is ``gmm_quant.cli.train``.
"""

from gmm_quant.cli.common import exit_now
from gmm_quant.cli.train import main

if __name__ == "__main__":
    exit_now(main())
