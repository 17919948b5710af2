"""``python -m gmm_quant.reuse``: cross-layer reuse candidates of a pretrained model.

The command itself is ``gmm_quant.cli.reuse``.
"""

from gmm_quant.cli.common import exit_now
from gmm_quant.cli.reuse import main

if __name__ == "__main__":
    exit_now(main())
