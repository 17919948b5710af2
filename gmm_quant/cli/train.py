"""Command line: ``python -m gmm_quant.train --config digits_mlp --workdir runs/digits``.

Parses flags (every config field is a flag: ``--tau 0.01``, ``--retrain-epochs 20``) and calls
``gmm_quant.run.job.train_and_evaluate``. Prints the per-layer table at the end; writes ``metrics.json``,
``model.gqz``, ``model.onnx`` and figures into the work directory. ``--config-file FILE`` reads a
JSON config instead (as ``python -m gmm_quant.tune`` writes for its best trial).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

from gmm_quant.cli import common as cli
from gmm_quant.run import config as cfgm
from gmm_quant.run import configs


def parser() -> argparse.ArgumentParser:
    ap = cli.Parser(
        prog="python -m gmm_quant.train",
        description="Compress a model by soft weight-sharing: pretrain, retrain with the mixture prior, "
        "compress to per-layer codebooks, fine-tune, evaluate, save and export.",
    )
    add_config_flags(ap)
    ap.add_argument("--workdir", default=None, help="where checkpoints and results go (default runs/CONFIG)")
    ap.add_argument(
        "--data-dir", default=None, help="directory with the MNIST .gz files (or $GMM_QUANT_DATA)"
    )
    add_input_flags(ap)
    ap.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the outputs and checkpoints of an earlier run in this workdir first",
    )
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--no-onnx", action="store_true", help="skip the ONNX export")
    multi = ap.add_argument_group("several processes (hosts): run the same command on each, with its own id")
    multi.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="process 0's address")
    multi.add_argument("--num-processes", type=int, default=None, metavar="N", help="how many processes run")
    multi.add_argument(
        "--process-id", type=int, default=None, metavar="I", help="0 .. N-1; 0 writes the results"
    )
    multi.add_argument(
        "--distributed", action="store_true",
        help="instead of the three above: what JAX reads from a Slurm, Open MPI or Kubernetes job "
        "(or JAX_COORDINATOR_ADDRESS with --num-processes / --process-id)",
    )  # fmt: skip
    cli.add_debug_flag(ap)
    add_override_flags(ap)
    return ap


def add_config_flags(ap: argparse.ArgumentParser) -> None:
    names = configs.available()
    ap.add_argument(
        "--config", default=None,
        help=f"experiment: one of {names} (default digits_mlp), or a .py file whose get_config() "
        "returns a Config",
    )  # fmt: skip
    ap.add_argument(
        "--config-file", default=None, help="a JSON file of config fields (gmm_quant.tune writes one)"
    )


def add_input_flags(ap: argparse.ArgumentParser) -> None:
    """--data and --pretrained: the user's own data and weights (train and tune alike)."""
    ap.add_argument(
        "--data", dest="set_dataset", default=None, metavar="DATA",
        help="your data (as --dataset): an .npz with x_train, y_train, x_test, y_test (and x_val, y_val), "
        "package.module:loader returning those arrays, or a Hugging Face datasets directory "
        "(--data-columns)",
    )  # fmt: skip
    ap.add_argument(
        "--pretrained", default=None,
        help="start from these weights: a .safetensors or .msgpack file or an Orbax checkpoint of your own "
        "training (matched by parameter path), a .gqz file, or another work directory's pretraining",
    )  # fmt: skip


def add_override_flags(ap: argparse.ArgumentParser) -> None:
    """One flag per config field, grouped by stage, its help line the field's documentation
    (``Config``'s source); a value given overrides the chosen --config's."""
    docs, groups, library = cfgm.field_help(), {}, cfgm.Config()
    for field in cfgm.fields():
        section, text = docs.get(field.name, ("other settings", ""))
        if section not in groups:
            groups[section] = ap.add_argument_group(f"config: {section} (values override --config's)")
        default = getattr(library, field.name)
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        shown = "none" if shown in ("", ()) else shown
        groups[section].add_argument(
            f"--{field.name.replace('_', '-')}", dest=f"set_{field.name}", metavar="VALUE",
            help=f"{text} [library default: {shown!s}]".replace("%", "%%"),
        )  # fmt: skip


def config_from_args(args) -> tuple[cfgm.Config, str]:
    """(config, its name) from --config / --config-file and the overrides; raises ConfigError/OSError."""
    if args.config and args.config_file:
        raise cfgm.ConfigError("give --config or --config-file, not both")
    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("set_") and v is not None}
    base = cfgm.load_file(args.config_file) if args.config_file else configs.load(args.config or "digits_mlp")
    name = pathlib.Path(args.config_file or args.config or "digits_mlp").stem
    if overrides.get("task") == "regress" and "distill_alpha" not in overrides:
        # the base config's distillation (the default job's) is for classifiers; one the user asks
        # for with a regression task is still refused by validate
        base = dataclasses.replace(base, distill_alpha=0.0)
    return cfgm.override(base, overrides), name


def value_flags(ap: argparse.ArgumentParser) -> set[str]:
    return {s for a in ap._actions if a.nargs is None and a.const is None for s in a.option_strings}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = parser()
    args = ap.parse_args(cli.quote_negative_values(argv, value_flags(ap)))
    try:
        cfg, name = config_from_args(args)
    except (cfgm.ConfigError, OSError) as err:
        print(f"error: {cli.describe(err)}", file=sys.stderr)
        return 2
    workdir = args.workdir or f"runs/{name}"

    def body() -> int:
        cli.quiet_libraries(argv)
        _start_processes(args)
        from gmm_quant.run import report
        from gmm_quant.run.job import train_and_evaluate

        metrics = train_and_evaluate(
            cfg, workdir, data_dir=args.data_dir, pretrained=args.pretrained,
            progress=not args.no_progress, overwrite=args.overwrite, export_onnx=not args.no_onnx,
        )  # fmt: skip
        if metrics is None:
            print(f"process {args.process_id}: done; process 0 wrote the results in {workdir}/")
            return 0
        print(report.format_table(metrics))
        print(f"results in {workdir}/ (metrics.json, model.gqz, weights.png, scatter.png)")
        return 0

    return cli.run(body, argv)


def _start_processes(args) -> None:
    """``jax.distributed`` when --coordinator / --num-processes / --process-id are given (all three), or
    from the cluster's environment with --distributed."""
    given = [args.coordinator is not None, args.num_processes is not None, args.process_id is not None]
    if args.distributed and not all(given):
        from gmm_quant.scale import distributed

        try:
            distributed.initialize(args.coordinator, args.num_processes, args.process_id)
        except ValueError as err:  # no cluster to detect: JAX says which value it lacks
            raise cfgm.ConfigError(
                f"--distributed: no cluster job found in the environment (JAX: {err})"
            ) from None
        return
    if not any(given):
        return
    if not all(given):
        raise cfgm.ConfigError(
            "several processes need --coordinator, --num-processes and --process-id together"
        )
    from gmm_quant.scale import distributed

    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
