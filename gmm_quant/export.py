"""``python -m gmm_quant.export``: export a compressed model to ONNX, verified in ONNX Runtime.

The command itself is ``gmm_quant.cli.export``.
"""

from gmm_quant.cli.common import exit_now
from gmm_quant.cli.export import main

if __name__ == "__main__":
    exit_now(main())
