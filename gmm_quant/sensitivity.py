"""``python -m gmm_quant.sensitivity``: per-layer sensitivity of a pretrained model to snapping and pruning.

The command itself is ``gmm_quant.cli.sensitivity``.
"""

from gmm_quant.cli.common import exit_now
from gmm_quant.cli.sensitivity import main

if __name__ == "__main__":
    exit_now(main())
