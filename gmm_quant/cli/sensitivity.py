"""`python -m gmm_quant.sensitivity`: how much error each quantised layer alone costs when snapped or pruned.

    python -m gmm_quant.sensitivity WORKDIR [--ks 3,5,9,17] [--fractions 0.5,0.9,0.99]

Writes ``sensitivity.json`` and ``sensitivity.png`` into WORKDIR and prints the table
(``gmm_quant.analysis.sensitivity`` computes it).
"""

from __future__ import annotations

import json
import pathlib
import sys

from gmm_quant._util.files import write_atomic
from gmm_quant.analysis.sensitivity import format_table, layer_sensitivity, plot
from gmm_quant.cli import common as cli
from gmm_quant.run.pretrained import pretrained_model


def _run(workdir: pathlib.Path, ks, fractions, data_dir=None) -> dict:
    apply_fn, params, paths, val = pretrained_model(workdir, data_dir)
    return layer_sensitivity(apply_fn, params, paths, val, ks=ks, fractions=fractions)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = cli.Parser(
        prog="python -m gmm_quant.sensitivity", description=__doc__.splitlines()[0].split(": ", 1)[1]
    )
    ap.add_argument("workdir", help="a work directory with a finished pretraining")
    ap.add_argument(
        "--data-dir", default=None, help="directory with the MNIST .gz files (or $GMM_QUANT_DATA)"
    )
    ap.add_argument("--ks", default="3,5,9,17", help="numbers of centres to try per layer")
    ap.add_argument("--fractions", default="0.5,0.9,0.99", help="fractions of smallest weights to zero")
    cli.add_debug_flag(ap)
    args = ap.parse_args(argv)

    def body() -> int:
        cli.quiet_libraries(argv)
        ks = tuple(int(v) for v in args.ks.split(","))
        fractions = tuple(float(v) for v in args.fractions.split(","))
        if min(ks) < 1 or not all(0 <= f < 1 for f in fractions):
            raise ValueError("--ks must be >= 1 and --fractions in [0, 1)")
        workdir = pathlib.Path(args.workdir)
        result = _run(workdir, ks, fractions, args.data_dir)
        write_atomic(workdir / "sensitivity.json", json.dumps(result, indent=1).encode())
        plot(result, workdir / "sensitivity.png")
        print(format_table(result))
        return 0

    return cli.run(body, argv)
