"""The budget search's rules, on trials replaced by given outcomes: failures, patience, the rungs
of successive halving and which trials go on from them, which over-budget trials are fine-tuned longer."""

import math

import pytest

from gmm_quant.run.config import Config
from gmm_quant.search import compress_to_budget
from gmm_quant.search import study as study_lib
from gmm_quant.search.trial import Outcome, rescues, rung_epochs


def fake_trials(monkeypatch, outcomes):
    """Replace a trial's training by the given outcomes (Exception instances are raised)."""
    calls = []

    def run_trial(cfg, *args, **kw):
        result = outcomes[min(len(calls), len(outcomes) - 1)]
        calls.append(cfg)
        if isinstance(result, BaseException):
            raise result
        return Outcome(result[1], result[0], cfg, False), {}, None, None

    monkeypatch.setattr(study_lib, "run_trial", run_trial)
    monkeypatch.setattr("gmm_quant.search.budget.run_trial", run_trial)
    return calls


def test_a_diverging_trial_is_recorded_failed_and_the_search_goes_on(monkeypatch, digits):
    nan = FloatingPointError("training diverged in retrain epoch 3: non-finite loss")
    calls = fake_trials(monkeypatch, [(10.0, 0.0), nan, (12.0, 0.0), (11.0, 0.0)])
    result = compress_to_budget(*digits, budget=5.0, trials=3, progress=False)
    states = [t.state.name for t in result.study.trials]
    assert states == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"] and len(calls) == 5
    assert result.compression_ratio == 11.0  # the re-run of the best (trial 2) gives the last outcome


def test_over_budget_trials_are_never_best_and_patience_stops_the_search(monkeypatch, digits):
    apply_fn, params, _, val = digits
    limit = 1.0 / 100 + __import__("gmm_quant").error_rate(apply_fn, params, *val)
    fake_trials(monkeypatch, [(20.0, limit - 1e-3), (90.0, limit + 1e-3), (15.0, 0.0), (16.0, 0.0)])
    result = compress_to_budget(*digits, budget=1.0, trials=20, patience=3, progress=False)
    assert len(result.study.trials) == 4  # best at trial 0, then 3 trials without improvement
    best = study_lib.feasible(result.study)[0]
    assert best.number == 0 and best.value == 20.0


@pytest.mark.parametrize(
    "epochs, warmup, rungs",
    [(30, 5, (5, 15)), (60, 5, (7, 21)), (100, 0, (12, 36)), (5, 5, ()), (10, 0, (2, 6))],
)
def test_rungs_start_after_the_warmup_and_grow_threefold_before_the_end(epochs, warmup, rungs):
    assert rung_epochs(Config(retrain_epochs=epochs, warmup_epochs=warmup)) == rungs


def test_only_a_trial_within_one_budget_over_the_limit_is_fine_tuned_longer():
    limit, budget = 0.0125, 0.001
    assert not rescues(0.0125, limit, budget)  # at the limit: within the budget already
    assert rescues(0.01251, limit, budget) and rescues(0.0135, limit, budget)
    assert not rescues(0.01351, limit, budget) and not rescues(0.0148, limit, budget)


def test_successive_halving_lets_only_the_best_third_at_a_rung_go_on(monkeypatch, digits):
    """Trials report at the base config's rungs (5, 15); the first trials at a rung go on only if best
    there so far, later ones if among the best third."""
    at_rungs = [(1.0, 1.0), (0.5, 9.0), (2.0, 0.0), (1.5, 1.0), (0.9, 0.0), (1.6, 2.0)]
    seen = []

    def run_trial(cfg, *args, report, rungs, **kw):
        values = at_rungs[len(seen)]
        seen.append(rungs)
        for value, epoch in zip(values, rungs, strict=True):
            report(value, epoch)
        return Outcome(0.0, 10.0 + len(seen), cfg, False), {}, None, None

    monkeypatch.setattr(study_lib, "run_trial", run_trial)
    monkeypatch.setattr("gmm_quant.search.budget.best_model", lambda search, study: study)
    study = compress_to_budget(*digits, budget=5.0, trials=6, progress=False,
                               base=Config(retrain_epochs=30, warmup_epochs=5))  # fmt: skip
    assert set(seen) == {(5, 15)}
    got = [(t.state.name, sorted(t.intermediate_values)) for t in study.trials]
    # rung 5: 1.0 | 0.5 < 1.0 | 2.0 | 1.5 not the best of [1, .5, 2, 1.5] (4 // 3: the top 1) |
    # 0.9 no | 1.6 among the top 2 of 6 (2.0, 1.6); rung 15: trial 0 alone | trial 2's 0.0 < 1.0 |
    # trial 5's 2.0 the best of 3
    assert got == [("COMPLETE", [5, 15]), ("PRUNED", [5]), ("PRUNED", [5, 15]), ("PRUNED", [5]),
                   ("PRUNED", [5]), ("COMPLETE", [5, 15])]  # fmt: skip


@pytest.mark.parametrize("budget, trials", [(-0.1, 3), (math.nan, 3), (math.inf, 3), (0.1, 0)])
def test_bad_budget_or_trials_fail_before_training(digits, budget, trials):
    with pytest.raises(ValueError, match=r"budget|trials"):
        compress_to_budget(*digits, budget=budget, trials=trials, progress=False)
