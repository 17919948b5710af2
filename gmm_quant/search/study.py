"""The Optuna study: storage, sampler, pruner and stopping rule.

The objective is the compression ratio (Han), maximised subject to a constraint: the validation error
may exceed the pretrained model's by at most ``budget`` percentage points. Optuna's TPE sampler takes
the constraint (``Trial.set_constraint``); successive halving stops, at each rung, the trials whose
scores are not in the top third of those that reached it (``trial.rung_epochs``); a study in an SQLite
file (or any database URL) survives a killed process and can be shared by several worker processes: each
worker's trials send heartbeats, and a trial whose worker died is marked failed and retried with the
same parameters (``RetryHeartbeatStaleTrialCallback``). In a work directory of our own,
``retry_orphans`` does the same at once on resume.
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import sys
import time
import warnings
from typing import NamedTuple

import jax
import numpy as np

from gmm_quant.run.config import Config
from gmm_quant.search import space as space_lib
from gmm_quant.search import targets
from gmm_quant.search.trial import HALVING, run_trial, rung_epochs

CONSTRAINT = "budget"  # the trial's constraint: val error - limit (<= 0 is within the budget)


# a trial that diverges (NaN) or whose file does not verify is recorded as failed; the search goes on
CATCH = (FloatingPointError, targets.Unshippable)


class StorageError(ValueError):
    """The study's storage URL cannot be opened."""


def open_study(storage=None, name="gmm_quant", seed=None, heartbeat=60, startup_trials=5, first_rung=1):
    """Create or load study ``name``; ``storage`` None keeps it in memory, else a database URL.
    ``first_rung``: the retraining epoch of the search's first rung (``rung_epochs(base)[0]``)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed trial is reported in our one line
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if storage is not None:
        storage = _database(storage, heartbeat)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials, multivariate=True)
    # a trial goes on from a rung if its score is among the best third there (the first HALVING - 1
    # trials at a rung: if it is the best so far); rungs at first_rung * HALVING**k epochs
    pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=first_rung, reduction_factor=HALVING)
    return optuna.create_study(
        storage=storage, study_name=name, direction="maximize", sampler=sampler, pruner=pruner,
        load_if_exists=True,
    )  # fmt: skip


def _database(url: str, heartbeat: float, attempts: int = 3):
    """Optuna's storage at ``url``. Two workers opening a new database at once both create its
    tables, and the later one fails with "table ... already exists": it tries again (the tables are
    then there) before the error becomes a ``StorageError``."""
    import optuna

    sqlite = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=sqlite,
                heartbeat_interval=heartbeat,
                grace_period=2 * heartbeat,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
            )
        except Exception as err:  # sqlalchemy raises many kinds; all mean "cannot open"
            if "already exists" in str(err) and attempt < attempts - 1:
                time.sleep(0.5)
                continue
            raise StorageError(f"cannot open the study storage {url!r}: {str(err).splitlines()[0]}") from None


def retry_orphans(study) -> list[int]:
    """Fail the trials left running by a killed process and queue their parameters again, as well as
    those of trials interrupted by Ctrl-C (which Optuna marks failed).

    Only for a study no other process is working on (the default storage in a locked work
    directory); a shared study relies on heartbeats instead. Returns the numbers retried.
    """
    from optuna.trial import TrialState

    retried = {t.user_attrs.get("retry_of") for t in study.trials}
    # failed, not by diverging nor an unverified file: interrupted (Ctrl-C can land anywhere in Optuna's loop)
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    interrupted = [t for t in failed if not {"diverged", "unshippable"} & set(t.user_attrs)]
    orphans = [t for t in study.trials if t.state == TrialState.RUNNING]
    for t in orphans:
        study.tell(t.number, state=TrialState.FAIL)
    again = [t for t in orphans + interrupted if t.number not in retried]
    for t in again:
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
    return [t.number for t in again]


def constraint(trial) -> float:
    """The worst of the trial's constraints (validation error minus the limit; with a size target, its
    file's bytes minus the target): <= 0 is feasible; inf for a trial without one."""
    return max(trial.constraints.values(), default=math.inf)


def feasible(study) -> list:
    """Completed trials within the budget, best (highest CR) first."""
    import optuna

    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    return sorted((t for t in done if constraint(t) <= 0), key=lambda t: -t.value)


def finished_trials(study) -> list:
    """Completed or pruned trials (failed ones do not count towards a search's trials)."""
    return [t for t in study.trials if t.state.is_finished() and t.state.name != "FAIL"]


def stop_when_converged(patience: int | None, target: int):
    """Callback: stop once ``target`` trials have finished (in any worker), or when the best feasible
    CR was found more than ``patience`` finished trials ago. Failed trials do not count."""

    def callback(study, _trial):
        finished = finished_trials(study)
        if len(finished) >= target:
            study.stop()
            return
        best = feasible(study)
        recent = {t.number for t in finished[-patience:]} if patience else set()
        if patience and best and len(finished) > patience and best[0].number not in recent:
            study.stop()

    return callback


class Search(NamedTuple):
    """What a search needs besides the study: the model, the data and the budget."""

    apply_fn: object
    pretrained: object
    train: tuple
    val: tuple
    base: Config
    space: space_lib.Space
    layers: list
    sensitive: list
    limit: float  # highest acceptable validation error (fraction)
    budget: float  # allowed increase (fraction)
    graphdef: object = None  # of the NNX model, when there is one (feature-map distillation needs it)
    metric: str = "error"  # or "perplexity": the judged value is then the perplexity's relative rise
    judge: object = None  # (apply_fn, params, x, y) -> judged value; None: the error rate
    max_bytes: float | None = None  # the shipped file's size target (search.targets); None: none
    target: str = "gqz"  # which file: "gqz" or "onnx"
    baseline: float = math.nan  # the pretrained model's judged value (validation error)
    max_latency_ms: float | None = None  # ONNX Runtime latency target (search.targets); None: none
    latency_batch: int = 1  # the batch it is measured on
    hidden: list | None = None  # the layers the unit prior may thin (not the output's); None: all


def objective(search: Search):
    """Optuna objective: one trial's CR; records its error, constraint and config."""
    import optuna

    def run(trial):
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        overrides = space_lib.suggest(trial, search.space, search.base, search.layers, search.sensitive,
                                      hidden=search.hidden)  # fmt: skip
        cfg = dataclasses.replace(search.base, **overrides)

        def report(value, step):
            trial.report(value, step)
            if trial.should_prune():
                raise optuna.TrialPruned()

        try:
            outcome, *_ = run_trial(
                cfg, search.apply_fn, search.pretrained, search.train, search.val,
                limit=search.limit, budget=search.budget, report=report, graphdef=search.graphdef,
                judge=search.judge, rungs=rung_epochs(search.base), **sized(search),
            )  # fmt: skip
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            raise
        except CATCH as err:
            trial.set_user_attr(
                "unshippable" if isinstance(err, targets.Unshippable) else "diverged", str(err)
            )
            print(f"trial {trial.number} failed ({err}); the search goes on", file=sys.stderr)
            raise
        trial.set_user_attr("val_error", outcome.val_error)
        trial.set_constraint(CONSTRAINT, outcome.val_error - search.limit)
        trial.set_user_attr("rescued", outcome.rescued)
        trial.set_user_attr("config", config_json(outcome.config))
        if not deploys(search):
            return outcome.compression_ratio
        trial.set_user_attr("compression_ratio", outcome.compression_ratio)
        if search.max_bytes is not None:
            trial.set_user_attr("file_bytes", outcome.file_bytes)
            trial.set_constraint(
                targets.CONSTRAINT, outcome.file_bytes / search.max_bytes - 1.0
            )  # a fraction
        if search.max_latency_ms is not None:
            trial.set_user_attr("latency_ms", outcome.latency_ms)
            trial.set_constraint(targets.LATENCY, outcome.latency_ms / search.max_latency_ms - 1.0)
        return -outcome.val_error  # the most accurate model that meets the targets

    return run


def deploys(search: Search) -> bool:
    """Whether the search has a deploy target (size or latency): its objective is then the error."""
    return search.max_bytes is not None or search.max_latency_ms is not None


def sized(search: Search) -> dict:
    """``run_trial``'s keywords for a search with deploy targets: measure them, score rungs by them."""
    if not deploys(search):
        return {}
    original = 4 * sum(int(np.size(v)) for v in jax.tree.leaves(search.pretrained))
    measure = targets.measure(
        search.target, search.val[0][:64], max_bytes=search.max_bytes,
        max_latency_ms=search.max_latency_ms, latency_batch=search.latency_batch,
    )  # fmt: skip
    return {"measure": measure, "rung_score": targets.rung_score(original, search.max_bytes)}


def config_json(cfg: Config) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def config_from_json(values: dict) -> Config:
    return Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
