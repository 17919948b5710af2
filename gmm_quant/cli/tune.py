"""Command line: compress to an accuracy budget, or to a file size.

    python -m gmm_quant.tune --config lenet5_caffe --data-dir ../shared/data \\
        --max-error-increase 0.10 --trials 40 --workdir runs/tune-lenet5
    python -m gmm_quant.tune --config lenet300_100 --data-dir ../shared/data --max-bytes 16000 --target onnx

Pretrains (or takes ``--pretrained``), then runs an Optuna study in ``WORKDIR/study.db`` whose trials
each retrain -> compress -> fine-tune from the pretrained model and are judged on the validation split;
the objective is the compression ratio (Han) with the validation error at most the pretrained model's
plus the budget; with ``--max-bytes`` it is the validation error, with the trial's real file (written
as the final run writes it) at most that size. Writes ``best_config.json`` (reproduce with ``python -m
gmm_quant.train --config-file WORKDIR/best_config.json --pretrained WORKDIR``), ``trials.csv``,
``pareto.png``, ``search.json`` and the final model trained with the best settings in
``WORKDIR/final`` (model.gqz, model.onnx, metrics.json, where the test error is reported for the
first time). Running the command again resumes the study; ``--storage URL`` shares one study between
machines (every worker runs the same command with the same URL and its own work directory).
"""

from __future__ import annotations

import sys

from gmm_quant.cli import common as cli
from gmm_quant.cli.train import (
    add_config_flags,
    add_input_flags,
    add_override_flags,
    config_from_args,
    value_flags,
)
from gmm_quant.run import config as cfgm
from gmm_quant.search.targets import THREADS  # light: the search's heavy modules load on use


def parser():
    ap = cli.Parser(prog="python -m gmm_quant.tune", description=__doc__.splitlines()[0])
    add_config_flags(ap)
    budget = ap.add_mutually_exclusive_group()
    budget.add_argument(
        "--max-error-increase",
        type=float,
        metavar="POINTS",
        help="budget: the validation error may rise by at most this many percentage points",
    )
    budget.add_argument("--max-perplexity-increase", type=float, metavar="PERCENT",
                        help="budget of a language model: the validation perplexity may rise by at most "
                        "this many percent")  # fmt: skip
    budget.add_argument("--max-rmse-increase", type=float, metavar="PERCENT",
                        help="budget of a regression model (--task regress): the validation RMSE may rise "
                        "by at most this many percent")  # fmt: skip
    ap.add_argument("--max-bytes", type=float, default=None, metavar="N",
                    help="size target: the most accurate model whose shipped file (--target) is at most N "
                    "bytes, with or without an accuracy budget")  # fmt: skip
    ap.add_argument("--target", choices=("gqz", "onnx"), default="gqz",
                    help="the file --max-bytes bounds: model.gqz (default) or model.onnx")  # fmt: skip
    ap.add_argument("--max-latency-ms", type=float, default=None, metavar="T",
                    help="latency target: the model.onnx answers a batch of --latency-batch in at most T ms "
                    f"in ONNX Runtime on this machine (median after warm-up, {THREADS} threads)")  # fmt: skip
    ap.add_argument("--latency-batch", type=int, default=1, metavar="B",
                    help="batch size the latency target is measured on (default 1)")  # fmt: skip
    ap.add_argument("--trials", type=int, default=20, help="finished trials to reach (default 20)")
    ap.add_argument("--workdir", default=None, help="default runs/tune-CONFIG")
    add_input_flags(ap)
    ap.add_argument(
        "--data-dir", default=None, help="directory with the MNIST .gz files (or $GMM_QUANT_DATA)"
    )
    ap.add_argument("--storage", default=None, help="database URL of the study (default WORKDIR/study.db)")
    ap.add_argument("--study-name", default="gmm_quant", help="study name in the storage")
    ap.add_argument(
        "--timeout", type=float, default=None, help="stop starting trials after this many seconds"
    )
    ap.add_argument("--patience", type=int, default=None, help="stop when the best is this many trials old")
    ap.add_argument(
        "--dimensions",
        default=None,
        help="what trials vary, comma-separated, from gmm_quant.search.DIMENSIONS (default: "
        "search.space.DEFAULT_DIMENSIONS; with --max-bytes / --max-latency-ms also the "
        "deployment choices the model supports: units, float_bits, activation_mode, heads)",
    )
    ap.add_argument("--heartbeat", type=int, default=60, help="seconds between a trial's liveness signals")
    ap.add_argument("--no-final", action="store_true", help="do not train the final model")
    ap.add_argument("--overwrite", action="store_true", help="delete an earlier search in this workdir first")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    cli.add_debug_flag(ap)
    add_override_flags(ap)
    return ap


def check_args(args) -> None:
    from gmm_quant.cli.tune_job import budget_of
    from gmm_quant.search import Space
    from gmm_quant.search.budget import check_inputs

    check_inputs(budget_of(args)[0], args.trials, None, args.max_bytes, args.target, args.max_latency_ms,
                 args.latency_batch)  # fmt: skip
    for name in ("timeout", "patience", "heartbeat"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise ValueError(f"--{name} must be > 0, got {value}")
    if args.dimensions is not None:
        Space(tuple(d for d in args.dimensions.split(",") if d))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = parser()
    args = ap.parse_args(cli.quote_negative_values(argv, value_flags(ap)))
    try:
        cfg, name = config_from_args(args)
        check_args(args)
    except (cfgm.ConfigError, OSError, ValueError) as err:
        print(f"error: {cli.describe(err)}", file=sys.stderr)
        return 2
    workdir = args.workdir or f"runs/tune-{name}"

    def body() -> int:
        cli.quiet_libraries(argv)
        from gmm_quant.cli.tune_job import tune_and_train

        summary = tune_and_train(cfg, workdir, args)
        print(summary)
        return 0

    return cli.run(body, argv)
