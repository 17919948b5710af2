"""Cross-layer reuse candidates: which same-shaped layers could share one stored matrix.

    python -m gmm_quant.reuse WORKDIR [--pretrained FILE.gqz] [--pattern REGEX] [--evaluate N]

For every ordered pair (target, source) of same-shaped quantised kernels of a run's pretrained
model: the per-output-channel scale ``s`` (last axis) that best maps the source onto the target
(least squares, channel by channel) and the similarity ``1 - ||target - source * s||^2 /
||target||^2`` — the share of the target's energy the scaled source explains (1: the same matrix up
to channel scales; 0: no better than zeros). For the ``N`` most similar pairs, the validation error
when the target is replaced by the scaled source (its bias kept): what reusing the source with a
per-channel output scale would cost before any retraining. Writes ``reuse.json`` and ``reuse.png``
(similarity heat map) into WORKDIR and prints the table. The validation split is the run's; the
test set is never read.
"""

from __future__ import annotations

import json
import pathlib
import re
import sys

from gmm_quant._util.files import write_atomic
from gmm_quant.cli import common as cli
from gmm_quant.surgery.reuse.candidates import format_table, plot, reuse_table


def _run(workdir: pathlib.Path, pattern: str, evaluate: int, data_dir=None, pretrained=None) -> dict:
    from gmm_quant.run.pretrained import pretrained_model

    apply_fn, params, quantised, val = pretrained_model(workdir, data_dir, pretrained)
    paths = [p for p in quantised if re.search(pattern, p)]
    if len(paths) < 2:
        raise ValueError(f"--pattern {pattern!r} matches {len(paths)} quantised layer(s); reuse needs two")
    return reuse_table(apply_fn, params, paths, val, evaluate)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = cli.Parser(prog="python -m gmm_quant.reuse", description=__doc__.splitlines()[0])
    ap.add_argument("workdir", help="a run's work directory (its config; results are written there)")
    ap.add_argument(
        "--pretrained",
        default=None,
        help="the model to examine: a .gqz file or a work directory "
        "with a pretraining (default: WORKDIR's own pretraining)",
    )
    ap.add_argument(
        "--data-dir", default=None, help="directory with the MNIST .gz files (or $GMM_QUANT_DATA)"
    )
    ap.add_argument("--pattern", default=".", help="regex of the quantised layers to compare")
    ap.add_argument("--evaluate", type=int, default=10, help="validation error of the N most similar pairs")
    cli.add_debug_flag(ap)
    args = ap.parse_args(argv)

    def body() -> int:
        cli.quiet_libraries(argv)
        if args.evaluate < 0:
            raise ValueError(f"--evaluate must be >= 0, got {args.evaluate}")
        try:
            re.compile(args.pattern)
        except re.error as err:
            raise ValueError(f"--pattern {args.pattern!r} is not a regular expression ({err})") from None
        workdir = pathlib.Path(args.workdir)
        result = _run(workdir, args.pattern, args.evaluate, args.data_dir, args.pretrained)
        write_atomic(workdir / "reuse.json", json.dumps(result, indent=1).encode())
        plot(result, workdir / "reuse.png")
        print(format_table(result))
        return 0

    return cli.run(body, argv)
