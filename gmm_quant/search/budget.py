"""``compress_to_budget``: the search as a library call on any model and data.

    result = compress_to_budget(apply_fn, params, (x_train, y_train), (x_val, y_val),
                                budget=0.1, trials=30)
    result.config, result.codebooks, result.params, result.study

``budget`` is the largest acceptable increase of the validation error over ``params``' own, in
percentage points; with ``metric="perplexity"`` (language models) it is the largest acceptable rise
of the validation perplexity, in percent of ``params``' own. The search never sees a test set: only
the training and validation splits given.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from tqdm.auto import tqdm

from gmm_quant.core.rules import flatten
from gmm_quant.run.config import Config
from gmm_quant.run.plan import build_plan
from gmm_quant.search import space as space_lib
from gmm_quant.search import study as study_lib
from gmm_quant.search.trial import first_rung, run_trial
from gmm_quant.training import loop


class SearchResult(NamedTuple):
    """The best trial's config, its compressed model (re-run from the pretrained params), the study."""

    config: Config | None  # None when no trial met the budget
    codebooks: dict | None
    params: object
    val_error: float
    compression_ratio: float
    study: object
    apply_fn: object = None  # the compressed model's apply_fn (a Stateful holds its trained state)
    file_bytes: int | None = None  # its shipped file's size, when the search had a size target
    latency_ms: float | None = None  # its ONNX Runtime latency, when the search had a latency target


class BudgetError(ValueError):
    """Bad search input, found before any training."""


def check_inputs(budget, trials, val, max_bytes=None, target="gqz", max_latency_ms=None, latency_batch=1):
    from gmm_quant.search import targets

    problem = targets.problem(max_bytes, target, max_latency_ms, latency_batch)
    if problem:
        raise BudgetError(problem)
    if budget is None and max_bytes is None and max_latency_ms is None:
        raise BudgetError("give an accuracy budget, a deploy target (max_bytes, max_latency_ms), or both")
    if budget is None:
        pass
    elif not isinstance(budget, int | float) or not math.isfinite(budget) or budget < 0:
        raise BudgetError(f"budget must be a finite number of percentage points >= 0, got {budget!r}")
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise BudgetError(f"trials must be a whole number >= 1, got {trials!r}")
    if val is not None and len(val[1]) == 0:
        raise BudgetError("the search needs a validation split (val_fraction > 0 or a val set)")


METRICS = ("error", "perplexity", "rmse")


def make_judge(metric: str, apply_fn, params, val):
    """``judge(apply_fn, params, val)`` -> the judged value (lower is better) and its baseline on
    ``params``: the validation error (a fraction), or the validation perplexity's rise over
    ``params``' own (a fraction: 0.02 = 2% higher; the same for a regression model's RMSE), so that
    one budget fraction serves all."""
    if metric == "error":
        return loop.error_rate, loop.error_rate(apply_fn, params, *val)
    if metric not in METRICS:
        raise BudgetError(f"unknown budget metric {metric!r}; choose one of {METRICS}")
    measure = loop.perplexity if metric == "perplexity" else loop.rmse
    reference = measure(apply_fn, params, *val)

    def rise(fn, p, x, y):
        return measure(fn, p, x, y) / reference - 1.0

    return rise, 0.0


def prepare(apply_fn, params, train, val, *, budget, base, space, graphdef=None, metric="error",
            max_bytes=None, target="gqz", max_latency_ms=None, latency_batch=1):  # fmt: skip
    """The search's fixed inputs in ``space`` (``resolve_space``'s): layers, the sensitivity-bounded
    keep_float candidates, the limit (none when ``budget`` is None: a size target alone)."""
    plan = build_plan(base, params)
    layers = plan.quantised()
    judge, baseline = make_judge(metric, apply_fn, params, val)
    sensitive = []
    if "keep_float" in space:
        from gmm_quant.analysis import sensitivity  # a command module: imported only when used

        table = sensitivity.layer_sensitivity(apply_fn, params, layers, val, ks=(3,), fractions=(),
                                              measure=judge)  # fmt: skip
        sizes = {p: int(np.size(v)) for p, v in flatten(params).items() if p in layers}
        sensitive = space_lib.sensitive_layers(table, (1.0 if budget is None else budget) / 100, sizes)
    limit = math.inf if budget is None else baseline + budget / 100
    return study_lib.Search(
        apply_fn,
        params,
        train,
        val,
        base,
        space,
        layers,
        sensitive,
        limit,
        0.0 if budget is None else budget / 100,
        graphdef,
        metric,
        judge,
        max_bytes,
        target,
        baseline,
        max_latency_ms,
        latency_batch,
        hidden_layers(apply_fn, params, layers, val[0][:1]) if "units" in space else None,
    )


def hidden_layers(apply_fn, params, layers: list[str], sample) -> list[str]:
    """The quantised leaves of 2 or more dimensions whose output units are not the model's: those
    whose last axis differs from the output's (the classes, the vocabulary), which a unit prior
    must not remove."""
    width = np.shape(apply_fn(params, sample))[-1]
    flat = flatten(params)
    return [p for p in layers if np.ndim(flat[p]) >= 2 and np.shape(flat[p])[-1] != width]


def resolve_space(space, graphdef, params, deploys: bool) -> space_lib.Space:
    """The space asked for (a ``BudgetError`` if it names a deployment choice the model does not
    support), or the default one (``space`` None; with a deploy target, ``deploys``, the deployment
    choices the model supports join it)."""
    supported = space_lib.deploy_dimensions(*_model_supports(graphdef, params))
    if space is None:
        extra = supported if deploys else ()
        return space_lib.Space(space_lib.DEFAULT_DIMENSIONS + extra)
    missing = [d for d in space.dimensions if d in space_lib.DEPLOY_DIMENSIONS and d not in supported]
    if missing:
        why = {"activation_mode": "no Linear layer, or model state (BatchNorm statistics, random streams)",
               "heads": "no nnx.MultiHeadAttention layer"}[missing[0]]  # fmt: skip
        raise BudgetError(f"search dimension {missing[0]!r} does not apply to this model: {why}")
    return space


def _model_supports(graphdef, params) -> tuple[bool, bool]:
    """(activation quantisation, attention heads): what the structural deployment choices need; a
    model with state (graphdef None) takes neither."""
    if graphdef is None:
        return False, False
    from flax import nnx

    from gmm_quant.surgery import activations, heads

    model = nnx.merge(graphdef, params)
    return bool(activations.points(model)), bool(heads.heads_kept(model))


def optimize(search: study_lib.Search, study, *, trials, timeout=None, patience=None, progress=True):
    """Run trials until ``trials`` have finished in the study, ``timeout`` seconds, or convergence."""
    _check_same_search(study, search)
    done = len(study_lib.finished_trials(study))
    if not study.trials:
        study.enqueue_trial(
            space_lib.base_point(search.space, search.layers, search.sensitive, search.base),
            skip_if_exists=True,
        )
    bar = tqdm(total=trials, initial=min(done, trials), desc="trials", disable=not progress, unit="trial")

    def tick(study_, trial):
        bar.update(trial.state.name != "FAIL")
        best = study_lib.feasible(study_)
        bar.set_postfix(best=f"{best[0].value:.1f}x" if best else "none within budget")

    try:
        if done < trials:  # failed trials do not count; at most as many failures as trials wanted
            study.optimize(
                study_lib.objective(search), n_trials=2 * (trials - done), timeout=timeout,
                catch=study_lib.CATCH,
                callbacks=[tick, study_lib.stop_when_converged(patience, trials)],
            )  # fmt: skip
    finally:
        bar.close()
    return study


def _check_same_search(study, search: study_lib.Search) -> None:
    """A study resumed (or shared) must have been made with the same limit and dimensions."""
    limit = round(search.limit, 9) if math.isfinite(search.limit) else None
    recorded = {"limit": limit, "dimensions": list(search.space.dimensions)}
    if search.metric != "error":  # recorded only when not the default: older studies resume
        recorded["metric"] = search.metric
    if search.max_bytes is not None:
        recorded["max_bytes"] = [search.max_bytes, search.target]
    if search.max_latency_ms is not None:
        recorded["max_latency_ms"] = [search.max_latency_ms, search.latency_batch]
    saved = {k: study.user_attrs[k] for k in recorded if k in study.user_attrs}
    if saved and saved != recorded:
        raise BudgetError(
            f"study {study.study_name!r} was made with {saved}, not {recorded}; "
            "use another study name (--study-name) or work directory"
        )
    for key, value in recorded.items():
        study.set_user_attr(key, value)


def best_model(search: study_lib.Search, study) -> SearchResult:
    """Re-run the best feasible trial's config (deterministic) to get its compressed model."""
    best = study_lib.feasible(study)
    if not best:
        return SearchResult(None, None, None, math.nan, math.nan, study)
    cfg = study_lib.config_from_json(best[0].user_attrs["config"])
    outcome, codebooks, params, apply_fn = run_trial(
        cfg,
        search.apply_fn,
        search.pretrained,
        search.train,
        search.val,
        limit=search.limit,
        budget=search.budget,
        graphdef=search.graphdef,
        judge=search.judge,
        **study_lib.sized(search),
    )
    return SearchResult(cfg, codebooks, params, outcome.val_error, outcome.compression_ratio, study, apply_fn,
                        outcome.file_bytes, outcome.latency_ms)  # fmt: skip


def compress_to_budget(
    apply_fn, params, train, val, *, budget=None, trials=20, base: Config | None = None, dimensions=None,
    storage=None, study_name="gmm_quant", timeout=None, patience=None, seed=0, progress=True, metric="error",
    max_bytes=None, target="gqz", max_latency_ms=None, latency_batch=1, graphdef=None,
) -> SearchResult:  # fmt: skip
    """Search settings that compress ``params`` most within ``budget`` points of validation error;
    with ``max_bytes``, the most accurate model whose shipped file (``target`` "gqz" or "onnx",
    measured on the real file of every trial) is at most that many bytes, and with ``max_latency_ms``
    whose ONNX file answers a batch of ``latency_batch`` in at most that many ms in ONNX Runtime here
    (and within ``budget``, if given too). No trial meeting them: ``SearchResult.config`` is None
    (``closest`` says by how much).

    ``base`` gives every setting the search does not vary (default ``Config()``); ``dimensions``
    names what it varies (default ``space.DEFAULT_DIMENSIONS``, and with a target the deployment
    choices the model supports: ``space.deploy_dimensions``); ``storage`` a database URL for a
    study that survives the process and is shared by workers (default: in memory); ``graphdef`` (of
    an NNX model without state: ``nnx.split(model, nnx.Param)``) lets trials change its structure
    (attention heads, activation quantisation).
    """
    check_inputs(budget, trials, val, max_bytes, target, max_latency_ms, latency_batch)
    space = space_lib.Space(tuple(dimensions)) if dimensions else None
    space = resolve_space(space, graphdef, params, max_bytes is not None or max_latency_ms is not None)
    base = base or Config()
    search = prepare(apply_fn, params, train, val, budget=budget, base=base, space=space, metric=metric,
                     max_bytes=max_bytes, target=target, max_latency_ms=max_latency_ms,
                     latency_batch=latency_batch, graphdef=graphdef)  # fmt: skip
    study = study_lib.open_study(storage, study_name, seed, first_rung=first_rung(base))
    optimize(search, study, trials=trials, timeout=timeout, patience=patience, progress=progress)
    return best_model(search, study)


def closest(study) -> str:
    """One line on the trial nearest to meeting a search's targets, when none met them."""
    import optuna

    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        return "no trial finished"
    best = min(done, key=study_lib.constraint)
    parts = []
    if best.constraints.get("bytes", 0) > 0:
        size = best.user_attrs["file_bytes"]
        parts.append(f"its file is {size:,} bytes, {100 * best.constraints['bytes']:.1f}% over the target")
    if best.constraints.get("latency", 0) > 0:
        ms = best.user_attrs["latency_ms"]
        parts.append(f"it takes {ms:.3f} ms, {100 * best.constraints['latency']:.1f}% over the target")
    if best.constraints.get(study_lib.CONSTRAINT, 0) > 0:
        parts.append(f"its validation error {100 * best.user_attrs['val_error']:.2f}% is "
                     f"{100 * best.constraints[study_lib.CONSTRAINT]:.2f} points over the limit")  # fmt: skip
    return f"no trial met the targets; the closest, trial {best.number}: " + "; ".join(parts)
