"""The budget search: its space, the data it sees, its outputs, resume, workers (its rules on
fake trials: test_search_rules.py)."""

import contextlib
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import optuna
import pytest
from flax import nnx

import models
from gmm_quant.run import config as cfgm
from gmm_quant.run.config import Config
from gmm_quant.run.plan import build_plan
from gmm_quant.search import Space
from gmm_quant.search import budget as budget_lib
from gmm_quant.search import space as space_lib
from gmm_quant.search import study as study_lib
from gmm_quant.training import data
from tests.cli_runs import ROOT, default_sigint, one_line

TUNE = [sys.executable, "-m", "gmm_quant.tune", "--config", "tiny", "--no-progress", "--retrain-epochs", "8",
        "--max-error-increase", "1.0"]  # fmt: skip
LAYERS = ["layers/0/kernel", "layers/1/kernel", "layers/2/kernel"]


def test_unknown_and_conflicting_dimensions_are_refused():
    with pytest.raises(ValueError, match="unknown search dimension 'taus'"):
        Space(("tau", "taus"))
    with pytest.raises(ValueError, match="exclude each other"):
        Space(("prune_threshold", "layer_prune"))


def test_suggestions_become_the_config_fields_they_name():
    base = Config(tau=0.01, gamma=(50.0, 0.01), zero_gamma=(500.0, 0.1), retrain_epochs=10)
    params = {"tau_x": 2.0, "hyperprior_x": 10.0, "own/layers/1/kernel": True, "own/layers/0/kernel": False,
              "own/layers/2/kernel": False, "prune/layers/0/kernel": 1e-3, "prune/layers/1/kernel": 1e-4,
              "prune/layers/2/kernel": 1e-5, "distill": True, "quantise_biases": True, "retrain_x": 2.0,
              "num_components": 9, "precision_x": 2.0}  # fmt: skip
    dims = Space(("tau", "hyperprior", "own_mixture", "layer_prune", "distill", "quantise_biases",
                  "retrain_epochs", "num_components", "precision"))  # fmt: skip
    out = space_lib.suggest(optuna.trial.FixedTrial(params), dims, base, LAYERS, [])
    cfg = cfgm.validate(Config(**{**Config().__dict__, **out}))
    assert cfg.tau == pytest.approx(0.02) and cfg.retrain_epochs == 20 and cfg.num_components == 9
    # strength x10 keeps the mean precision alpha / beta; precision x2 halves the betas
    assert cfg.gamma == pytest.approx((500.0, 0.05)) and cfg.zero_gamma == pytest.approx((5000.0, 0.5))
    assert cfg.distill_alpha == 0.5 and cfg.quantise_biases
    _, p = nnx.split(models.create("digits_mlp", 0), nnx.Param)
    plan = build_plan(cfg, p)
    assert set(plan.mixtures) == {"shared", "layers/1/kernel", *(f"layers/{i}/bias" for i in range(3))}
    assert [plan.rules[f"{layer}"].prune_threshold for layer in LAYERS] == pytest.approx([1e-3, 1e-4, 1e-5])


def test_the_base_point_reproduces_the_base_config():
    base = Config(tau=0.01, retrain_epochs=10)
    point = space_lib.base_point(Space(), LAYERS, [])
    out = space_lib.suggest(optuna.trial.FixedTrial(point), Space(), base, LAYERS, [])
    assert out["tau"] == base.tau and out["gamma"] == base.gamma and out["zero_gamma"] == base.zero_gamma
    assert out["own_mixture"] == () and out["distill_alpha"] == 0 and not out["quantise_biases"]


def test_the_units_dimension_turns_the_unit_prior_on_or_scales_the_base_configs():
    dims = Space(("units",))
    on = space_lib.suggest(
        optuna.trial.FixedTrial({"units": True, "unit_strength": 0.5}), dims, Config(), LAYERS, []
    )
    off = space_lib.suggest(optuna.trial.FixedTrial({"units": False}), dims, Config(), LAYERS, [])
    assert on["unit_prior"] == (".*=0.5",) and off["unit_prior"] == ()
    _, p = nnx.split(models.create("digits_mlp", 0), nnx.Param)
    plan = build_plan(cfgm.validate(Config(**on)), p)
    assert [plan.rules[layer].unit_prior for layer in LAYERS] == [0.5, 0.5, 0.5]
    graphdef, p = nnx.split(models.create("digits_mlp", 0), nnx.Param)
    hidden = budget_lib.hidden_layers(
        lambda q, x: nnx.merge(graphdef, q)(x), p, LAYERS, np.zeros((1, 8, 8, 1))
    )
    assert hidden == LAYERS[:2]  # the classes' layer keeps its output units
    trial = optuna.trial.FixedTrial({"units": True, "unit_strength": 0.5})
    cfg = cfgm.validate(Config(**space_lib.suggest(trial, dims, Config(), LAYERS, [], hidden=hidden)))
    assert [build_plan(cfg, p).rules[layer].unit_prior for layer in LAYERS] == [0.5, 0.5, 0.0]
    base = Config(unit_prior=("layers/0/=2", "layers/1/=0.5"))
    scaled = space_lib.suggest(optuna.trial.FixedTrial({"unit_x": 0.1}), dims, base, LAYERS, [])
    assert scaled["unit_prior"] == ("layers/0/=0.2", "layers/1/=0.05")
    for cfg in (Config(), base):  # the base point is the base config's unit prior
        point = space_lib.base_point(dims, LAYERS, [], cfg)
        assert (
            space_lib.suggest(optuna.trial.FixedTrial(point), dims, cfg, LAYERS, [])["unit_prior"]
            == cfg.unit_prior
        )


def row_hashes(x):
    return sorted(hashlib.sha1(np.ascontiguousarray(r).tobytes()).hexdigest() for r in np.asarray(x))


def test_the_search_sees_the_training_data_and_never_the_test_set(monkeypatch, tmp_path):
    from gmm_quant.cli import tune
    from gmm_quant.search import trial as trial_lib

    seen, real = [], trial_lib.run_trial

    def spy(cfg, apply_fn, pretrained, train, val, **kw):
        seen.append((train, val))
        return real(cfg, apply_fn, pretrained, train, val, **kw)

    monkeypatch.setattr(study_lib, "run_trial", spy)
    monkeypatch.setattr("gmm_quant.search.budget.run_trial", spy)
    argv = [*TUNE[3:], "--trials", "2", "--no-final", "--workdir", str(tmp_path / "w")]
    assert tune.main(argv) == 0
    full = data.load("digits")
    assert len(seen) == 2
    for train, val in seen:
        rows = row_hashes(np.concatenate([train[0], val[0]]))
        assert rows == row_hashes(full.x_train)  # exactly the training data: train + validation split
        assert not set(row_hashes(val[0])) & set(row_hashes(train[0]))


def tune(workdir, *extra, **kw):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [*TUNE, "--workdir", str(workdir), *extra]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, text=True, preexec_fn=default_sigint, **kw)


def finished(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return out


def test_a_three_trial_search_writes_a_config_that_reproduces_its_best(tmp_path):
    start = time.perf_counter()
    finished(
        tune(tmp_path / "w", "--trials", "3", "--no-final", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    )
    print(f"3-trial search on digits: {time.perf_counter() - start:.0f} s")
    summary = json.loads((tmp_path / "w" / "search.json").read_text())
    assert summary["trials"] == 3 and (tmp_path / "w" / "pareto.png").stat().st_size > 1000
    best = str(tmp_path / "w" / "best_config.json")
    cmd = [
        sys.executable,
        "-m",
        "gmm_quant.train",
        "--config-file",
        best,
        "--pretrained",
        str(tmp_path / "w"),
        "--workdir",
        str(tmp_path / "again"),
        "--no-progress",
        "--no-onnx",
    ]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    metrics = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert metrics["val_error_finetuned"] == summary["best_val_error"]
    assert metrics["compression_ratio"] == pytest.approx(summary["best_compression_ratio"], rel=1e-12)


def test_two_workers_creating_one_database_at_once_both_open_it(tmp_path, monkeypatch):
    calls = []

    class Racing(optuna.storages.RDBStorage):  # the other worker created the tables before our CREATE
        def __init__(self, url, **kw):
            calls.append(url)
            if len(calls) == 1:
                raise RuntimeError("(sqlite3.OperationalError) table studies already exists\n[SQL: CREATE]")
            super().__init__(url, **kw)

    class Broken(optuna.storages.RDBStorage):
        def __init__(self, url, **kw):
            raise OSError("disk\nI/O")

    monkeypatch.setattr(optuna.storages, "RDBStorage", Racing)
    study = study_lib.open_study(f"sqlite:///{tmp_path / 'study.db'}")
    assert len(calls) == 2 and study.study_name == "gmm_quant"
    monkeypatch.setattr(optuna.storages, "RDBStorage", Broken)
    with pytest.raises(study_lib.StorageError, match=r"^cannot open the study storage .*: disk$"):
        study_lib.open_study(f"sqlite:///{tmp_path / 'other.db'}")


def wait_for_running_trial(proc, db, after_finished=1, timeout=300):  # generous: a loaded machine
    """The number of a trial running after `after_finished` trials ended (complete or pruned)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        time.sleep(0.5)
        if proc.poll() is not None:  # the search ended before a trial could be caught running
            raise AssertionError(f"tune exited with {proc.returncode} before a trial was caught running")
        if not db.exists():
            continue
        # read-only: optuna.load_study would create the tables, racing tune creating them
        try:
            with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)) as con:
                trials = con.execute("SELECT number, state FROM trials ORDER BY number").fetchall()
        except sqlite3.Error:  # the study is being created, or the database is locked for a write
            continue
        states = [state for _, state in trials]
        ended = states.count("COMPLETE") + states.count("PRUNED")
        if ended >= after_finished and "RUNNING" in states:
            return next(number for number, state in trials if state == "RUNNING")
    raise AssertionError("no trial started")


def test_a_search_killed_or_interrupted_mid_trial_resumes_and_retries_that_trial(tmp_path):
    workdir, db = tmp_path / "w", tmp_path / "w" / "study.db"
    log = tmp_path / "stderr.txt"  # a file, not a pipe nobody reads while waiting (a full pipe blocks tune)
    quiet = {"stdout": subprocess.DEVNULL, "stderr": log.open("w")}
    proc = tune(workdir, "--trials", "4", "--no-final", **quiet)
    wait_for_running_trial(proc, db)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    assert proc.returncode == 130, log.read_text()
    assert "run the same command to resume" in one_line(log.read_text())
    proc = tune(workdir, "--trials", "4", "--no-final", **quiet)
    wait_for_running_trial(proc, db, after_finished=2)
    proc.kill()
    proc.wait()
    storage = f"sqlite:///{db}"
    cut = [t.number for t in optuna.load_study(study_name="gmm_quant", storage=storage).trials
           if t.state.name in ("RUNNING", "FAIL")]  # fmt: skip
    assert cut  # the kill left a trial running (a signal between two trials leaves none to retry)
    finished(tune(workdir, "--trials", "4", "--no-final", **quiet))
    trials = optuna.load_study(study_name="gmm_quant", storage=storage).trials
    retried = {t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs}
    for number in cut:  # every cut trial failed and was queued again with its parameters
        assert trials[number].state.name == "FAIL" and number in retried
    failed_uncut = [t for t in trials if t.state.name == "FAIL" and t.number not in retried]
    assert not failed_uncut and all(t.state.name != "RUNNING" for t in trials)
    assert sum(t.state.name in ("COMPLETE", "PRUNED") for t in trials) == 4


def test_two_workers_share_one_study(tmp_path):
    """Worker 2 starts once worker 1 has finished a trial and aims at more trials than worker 1, so
    both contribute however the two processes are scheduled; one study holds every trial."""
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    quiet = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    first = tune(tmp_path / "w1", "--trials", "3", "--no-final", "--storage", url, **quiet)
    deadline = time.time() + 180
    while time.time() < deadline and not _finished_trials(url):
        time.sleep(0.5)
    second = tune(tmp_path / "w2", "--trials", "5", "--no-final", "--storage", url, **quiet)
    finished(first)
    finished(second)
    trials = optuna.load_study(study_name="gmm_quant", storage=url).trials
    done = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(done) >= 5 and len({t.number for t in trials}) == len(trials)
    assert len({t.user_attrs["worker"] for t in done}) == 2


def _finished_trials(url) -> int:
    try:
        trials = optuna.load_study(study_name="gmm_quant", storage=url).trials
    except Exception:  # not created yet
        return 0
    return sum(t.state.name in ("COMPLETE", "PRUNED") for t in trials)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--max-error-increase", "-0.1"], "budget must be"),
        (["--max-error-increase", "nan"], "budget must be"),
        (["--trials", "0"], "trials must be"),
        (["--dimensions", "tau,colour"], "unknown search dimension 'colour'"),
        (["--storage", "sqlite:////nonexistent/dir/study.db"], "cannot open the study storage"),
        (["--storage", "nosuchdb://x"], "cannot open the study storage"),
        (["--patience", "0"], "--patience must be > 0"),
    ],
)
def test_bad_search_input_is_one_line_before_anything_is_written(tmp_path, extra, message):
    proc = tune(tmp_path / "w", *extra, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (1, 2) and message in one_line(err)
    assert not (tmp_path / "w").exists()
