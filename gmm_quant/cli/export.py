"""`python -m gmm_quant.export`: ONNX export of a compressed model, verified in ONNX Runtime.

The library part is ``gmm_quant.formats.export``.
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np

from gmm_quant.cli import common as cli
from gmm_quant.formats.export import ENCODING, ENCODINGS, check_output, export_file


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = cli.Parser(prog="python -m gmm_quant.export", description=__doc__.splitlines()[0].split(": ", 1)[1])
    ap.add_argument("source", help="a work directory (uses its model.gqz) or a .gqz file")
    ap.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    ap.add_argument(
        "--encoding", choices=ENCODINGS, default=ENCODING, help=f"weight encoding (default {ENCODING})"
    )
    ap.add_argument("--tolerance", type=float, default=1e-4, help="max abs difference allowed vs JAX")
    ap.add_argument(
        "--force", action="store_true", help="replace an existing file that is not our ONNX output"
    )
    ap.add_argument(
        "--model", default=None, help="the model (package.module:factory), overriding the one the file names"
    )
    ap.add_argument(
        "--trust-model",
        action="store_true",
        help="import and call the package.module:factory the file names (it runs that code; off by default)",
    )
    ap.add_argument("--input-shape", default=None, help="one example's shape for the check, e.g. 28,28,1")
    cli.add_debug_flag(ap)
    args = ap.parse_args(argv)

    def body() -> int:
        if not (args.tolerance >= 0 and np.isfinite(args.tolerance)):
            raise ValueError(f"--tolerance must be a finite number >= 0, got {args.tolerance}")
        source, output = pathlib.Path(args.source), pathlib.Path(args.output)
        check_output(source, output, force=args.force)
        model_path = source / "model.gqz" if source.is_dir() else source
        sample = None
        if args.input_shape:
            try:
                shape = tuple(int(v) for v in args.input_shape.split(","))
            except ValueError:
                raise ValueError(f"--input-shape {args.input_shape!r}: expected sizes like 28,28,1") from None
            if min(shape) < 1:
                raise ValueError(f"--input-shape {args.input_shape!r}: sizes must be >= 1")
            sample = np.random.default_rng(0).normal(size=(64, *shape)).astype(np.float32)
        info = export_file(
            model_path,
            output,
            encoding=args.encoding,
            tolerance=args.tolerance,
            model=args.model,
            trust_model=args.trust_model,
            sample=sample,
        )
        print(f"wrote {output}: {info['bytes']} bytes, max |ONNX - JAX| = {info['max_abs_diff']:.2e}")
        return 0

    return cli.run(body, argv)
