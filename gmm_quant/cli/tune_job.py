"""What ``python -m gmm_quant.tune`` does, importable: ``tune_and_train(config, workdir, args)``.

Everything the user gave is checked before the work directory is touched (config, data, pretrained
model, storage URL, the directory itself); then pretraining (checkpointed, resumable), the study,
its outputs, and the final model trained with the best settings in ``WORKDIR/final``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time

from gmm_quant._util.files import write_atomic
from gmm_quant.run import config as cfgm
from gmm_quant.run import inputs, stages
from gmm_quant.run import job as run
from gmm_quant.run import workdir as wd
from gmm_quant.run.pretrained import pretrained_weights
from gmm_quant.search import budget as budget_lib
from gmm_quant.search import outputs
from gmm_quant.search import space as space_lib
from gmm_quant.search import study as study_lib
from gmm_quant.search import trial as trial_lib
from gmm_quant.training import data, modes


def tune_and_train(cfg: cfgm.Config, workdir, args) -> str:
    cfgm.validate(cfg)
    for name in ("head_threshold", "head_ratio", "reuse", "reuse_budget"):
        if getattr(cfg, name):  # trials run retrain -> compress -> fine-tune only
            raise cfgm.ConfigError(f"config field {name!r}: the search does not prune heads or reuse layers")
    workdir = pathlib.Path(workdir)
    wd.check_usable(workdir, overwrite=args.overwrite)
    named = tuple(d for d in (args.dimensions or "").split(",") if d)
    space = space_lib.Space(named) if named else None  # None: the defaults (budget_lib.resolve_space)
    apply_fn, params, graphdef = inputs.build_model(cfg)
    ds, val = data.split_validation(inputs.load_data(cfg, args.data_dir), cfg.val_fraction, cfg.seed)
    run.check_data(cfg, ds, len(val[1]))
    inputs.check_fits(cfg, apply_fn, params, ds)
    budget, metric = budget_of(args)
    budget_lib.check_inputs(budget, args.trials, val, args.max_bytes, args.target, args.max_latency_ms,
                            args.latency_batch)  # fmt: skip
    deploys = args.max_bytes is not None or args.max_latency_ms is not None
    space = budget_lib.resolve_space(space, graphdef, params, deploys)  # before anything is written
    if args.pretrained is not None:
        params, state = pretrained_weights(args.pretrained, params, modes.state_of(apply_fn))
        apply_fn = modes.with_state(apply_fn, state)
    if args.storage is not None:  # a URL that cannot be opened fails here, before any training
        study_lib.open_study(args.storage, args.study_name, heartbeat=args.heartbeat)

    train, start = (ds.x_train, ds.y_train), time.perf_counter()
    with wd.Lock(workdir):
        if args.overwrite:
            wd.clear(workdir)
        wd.claim(workdir, cfg, inputs.data_digest(cfg, ds, val))
        if args.pretrained is None:
            apply_fn, params = _pretrain(cfg, workdir, apply_fn, train, val, params, not args.no_progress)
        base = dataclasses.replace(cfg, pretrain_epochs=0)
        search = budget_lib.prepare(apply_fn, params, train, val, budget=budget, base=base, space=space,
                                    graphdef=graphdef, metric=metric, max_bytes=args.max_bytes,
                                    target=args.target, max_latency_ms=args.max_latency_ms,
                                    latency_batch=args.latency_batch)  # fmt: skip
        storage = args.storage or f"sqlite:///{workdir.resolve() / 'study.db'}"
        seed = None if args.storage else cfg.seed  # shared studies: workers must not draw the same trials
        study = study_lib.open_study(storage, args.study_name, seed, heartbeat=args.heartbeat,
                                     first_rung=trial_lib.first_rung(base))  # fmt: skip
        if args.storage is None:  # ours alone (the work directory is locked): running = killed
            study_lib.retry_orphans(study)
        budget_lib.optimize(search, study, trials=args.trials, timeout=args.timeout, patience=args.patience,
                            progress=not args.no_progress)  # fmt: skip
        return _finish(workdir, search, study, args, time.perf_counter() - start)


def _pretrain(cfg, workdir, apply_fn, train, val, params, progress):
    def runner(name, setup, epochs, parent, stop=None, placement=None, model_state=None):
        return run.run_stage(workdir, name, setup, train, cfg, epochs, progress, parent, placement, stop,
                             model_state)  # fmt: skip

    ctx = stages.Context(cfg, train, val, runner)
    model, _record = stages.pretrain(ctx, stages.Model(apply_fn, params), stages.Record())
    return model.apply_fn, model.params


WHAT = {
    "error": ("validation error", "val err %"),
    "perplexity": ("validation perplexity rise", "ppl rise %"),
    "rmse": ("validation RMSE rise", "RMSE rise %"),
}


def _bound_by(study, best, search) -> str:
    """Which target decided the choice: the one a more accurate trial missed."""
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    better = [t for t in done if t.user_attrs["val_error"] < best.user_attrs["val_error"]]
    met, missed = [], []
    if search.max_bytes is not None:
        size = f"size {best.user_attrs['file_bytes']:,} of {search.max_bytes:,.0f} bytes ({search.target})"
        over = any(t.constraints.get("bytes", 0) > 0 for t in better)
        (missed if over else met).append(size)
    if search.max_latency_ms is not None:
        ms = f"latency {best.user_attrs['latency_ms']:.3f} of {search.max_latency_ms:g} ms"
        over = any(t.constraints.get("latency", 0) > 0 for t in better)
        (missed if over else met).append(ms)
    if missed:
        return f"bound by the target ({'; '.join(missed)}): more accurate trials missed it"
    return f"the most accurate trial meets the targets: {'; '.join(met)}"


def budget_of(args) -> tuple[float, str]:
    """(budget, metric) from --max-error-increase or --max-perplexity-increase."""
    if args.max_perplexity_increase is not None:
        return args.max_perplexity_increase, "perplexity"
    if getattr(args, "max_rmse_increase", None) is not None:
        return args.max_rmse_increase, "rmse"
    return args.max_error_increase, "error"


def _finish(workdir, search, study, args, seconds) -> str:
    limit, baseline = 100 * search.limit, 100 * search.baseline
    what, column = WHAT[search.metric]
    rows = outputs.trial_rows(study)
    outputs.write_table(rows, workdir / "trials.csv")
    marks = {"file_bytes": search.max_bytes, "latency_ms": search.max_latency_ms}
    outputs.plot_pareto(rows, limit, baseline, workdir / "pareto.png", label=f"{what} (%)",
                        targets={k: v for k, v in marks.items() if v is not None})  # fmt: skip
    lines = [outputs.format_table(rows, limit, column)]
    best = study_lib.feasible(study)
    summary = {
        "metric": search.metric, "budget_points": budget_of(args)[0], "pretrained_val_error": baseline / 100,
        "limit_val_error": search.limit if math.isfinite(search.limit) else None, "trials": len(rows),
        "seconds_this_run": seconds,
        **({"max_bytes": search.max_bytes, "target": search.target} if search.max_bytes else {}),
        **({"max_latency_ms": search.max_latency_ms, "latency_batch": search.latency_batch}
           if search.max_latency_ms else {}),
    }  # fmt: skip
    if best:
        lines += _best(workdir, best[0], baseline, args, summary, what)
        if study_lib.deploys(search):
            lines.append(_bound_by(study, best[0], search))
    elif study_lib.deploys(search):
        lines.append(budget_lib.closest(study))
    else:
        lines.append(f"no trial met the budget ({what} <= {limit:.2f}%): more trials, or a larger budget")
    write_atomic(workdir / "search.json", json.dumps(summary, indent=1).encode())
    return "\n".join(lines)


FINAL_KEYS = ("error_pretrained", "error_finetuned", "val_error_finetuned", "compression_ratio",
              "perplexity_pretrained", "perplexity_finetuned", "val_perplexity_finetuned",
              "rmse_pretrained", "rmse_finetuned", "val_rmse_finetuned")  # fmt: skip


def _best(workdir, best, baseline, args, summary, what) -> list[str]:
    """Write the best config, train the final model with it; lines for the summary."""
    values, err = best.user_attrs["config"], best.user_attrs["val_error"]
    outputs.write_config(values, workdir / "best_config.json")
    source = args.pretrained or str(workdir)
    command = f"python -m gmm_quant.train --config-file {workdir}/best_config.json --pretrained {source}"
    cr = best.user_attrs.get("compression_ratio", best.value)  # a size target's objective is the error
    summary.update(best_trial=best.number, best_compression_ratio=cr, best_val_error=err)
    summary["reproduce"] = command
    lines = [f"best: trial {best.number}, {cr:.1f}x at {what} {100 * err:.2f}% (pretrained {baseline:.2f}%)"]
    if not args.no_final:
        metrics = run.train_and_evaluate(
            study_lib.config_from_json(values), workdir / "final", data_dir=args.data_dir,
            pretrained=source, progress=not args.no_progress, overwrite=True,
        )  # fmt: skip
        summary["final"] = {k: metrics[k] for k in FINAL_KEYS if k in metrics}
        ratio = metrics["compression_ratio"]
        if "rmse_finetuned" in metrics:
            change = f"test RMSE {metrics['rmse_pretrained']:.4g} -> {metrics['rmse_finetuned']:.4g}"
        else:
            before, after = 100 * metrics["error_pretrained"], 100 * metrics["error_finetuned"]
            change = f"test error {before:.2f}% -> {after:.2f}%"
        lines.append(f"final model in {workdir}/final: {change} at {ratio:.1f}x")
        if "perplexity_finetuned" in metrics:
            ppl = f"{metrics['perplexity_pretrained']:.3f} -> {metrics['perplexity_finetuned']:.3f}"
            lines.append(f"test perplexity {ppl}")
    lines.append(f"reproduce: {command} --workdir NEW_DIR")
    return lines
