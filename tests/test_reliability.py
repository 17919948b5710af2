"""Hostile-user cases of the command line: nothing of the user's is lost, damaged checkpoints are
caught, one run per work directory, and every user error is one line on stderr (issue 9)."""

import errno
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from gmm_quant import checkpoint as ckpt
from gmm_quant import config as cfgm
from gmm_quant import data, export, train
from gmm_quant import workdir as wd

ROOT = pathlib.Path(__file__).resolve().parents[1]
ERRORS = ("error_pretrained", "error_retrained", "error_compressed", "error_finetuned")
CLI = [sys.executable, "-m", "gmm_quant.train", "--config", "tiny", "--no-progress", "--retrain-epochs", "8"]


def _snapshot(directory: pathlib.Path) -> dict:
    """Every file under ``directory`` with its bytes: compared before and after an attack."""
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


def _one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{text}"
    assert "Traceback" not in text
    return lines[0]


def _popen(workdir, *extra, **kw):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [*CLI, "--workdir", str(workdir), *extra]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, text=True, **kw)


def _run(workdir, *extra):
    proc = _popen(workdir, *extra, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def _metrics(workdir):
    m = json.loads((pathlib.Path(workdir) / "metrics.json").read_text())
    return {k: m[k] for k in (*ERRORS, "nonzero_fraction", "compression_ratio")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One finished tiny run, uninterrupted: what every resumed or repaired run must equal."""
    workdir = tmp_path_factory.mktemp("ref") / "w"
    code, _out, err = _run(workdir)
    assert code == 0, err
    return workdir


# --- data loss -------------------------------------------------------------------------------------


@pytest.mark.parametrize("overwrite", [True, False])
def test_a_directory_that_is_not_ours_is_refused_and_untouched(tmp_path, capsys, overwrite):
    user = tmp_path / "thesis"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    (user / "model.gqz").write_bytes(b"the user's own file of the same name")
    before = _snapshot(user)
    flags = ["--overwrite"] if overwrite else []
    assert train.main(["--config", "tiny", "--workdir", str(user), "--no-progress", *flags]) == 1
    line = _one_line(capsys.readouterr().err)
    assert str(user) in line and "not a gmm_quant work directory" in line
    assert _snapshot(user) == before


def test_overwrite_deletes_only_what_the_pipeline_wrote(tmp_path):
    workdir = tmp_path / "w"
    wd.claim(workdir, cfgm.load("tiny"))
    for name in ("metrics.json", "model.gqz", "model.onnx", "weights.png", "scatter.png"):
        (workdir / name).write_bytes(b"output")
    (workdir / "checkpoints" / "retrain" / "3").mkdir(parents=True)
    (workdir / "notes.txt").write_text("mine")
    (workdir / "plots").mkdir()
    (workdir / "plots" / "fig.pdf").write_bytes(b"%PDF")
    removed = wd.clear(workdir)
    assert sorted(removed) == sorted(wd.OUTPUTS)
    assert _snapshot(workdir) == {"notes.txt": b"mine", "plots/fig.pdf": b"%PDF"}


def test_an_empty_directory_and_an_existing_file_as_workdir(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    wd.check_usable(empty, overwrite=True)  # an empty directory may be used
    a_file = tmp_path / "results.csv"
    a_file.write_text("1,2,3")
    assert train.main(["--config", "tiny", "--workdir", str(a_file), "--no-progress"]) == 1
    assert "is an existing file" in _one_line(capsys.readouterr().err)
    assert a_file.read_text() == "1,2,3"


@pytest.fixture(scope="module")
def gqz(tmp_path_factory):
    """A small compressed file (digits MLP, random weights) to export."""
    from flax import nnx

    import gmm_quant as gq
    import models

    _graphdef, params = nnx.split(models.create("digits_mlp"), nnx.Param)
    plan = gq.make_plan(params)
    codebooks, snapped = gq.compress(plan, gq.init_mixtures(plan, params), params)
    path = tmp_path_factory.mktemp("gqz") / "model.gqz"
    gq.save_compressed(path, codebooks, snapped, model="digits_mlp", config={"dataset": "digits"})
    return path


def test_export_refuses_to_write_over_its_input(gqz, tmp_path, capsys):
    work = tmp_path / "w"
    work.mkdir()
    shutil.copy(gqz, work / "model.gqz")
    before = _snapshot(work)
    for source in (work, work / "model.gqz"):
        assert export.main([str(source), "-o", str(work / "model.gqz")]) == 1
        assert "over its input" in _one_line(capsys.readouterr().err)
    assert _snapshot(work) == before


def test_export_overwrites_only_its_own_onnx_files_unless_forced(gqz, tmp_path, capsys):
    other = tmp_path / "report.docx"
    other.write_bytes(b"PK\x03\x04 a document")
    assert export.main([str(gqz), "-o", str(other)]) == 1
    assert "not an ONNX file written by gmm_quant" in _one_line(capsys.readouterr().err)
    assert other.read_bytes() == b"PK\x03\x04 a document"
    ours = tmp_path / "m.onnx"
    assert export.main([str(gqz), "-o", str(ours)]) == 0
    assert export.main([str(gqz), "-o", str(ours), "--encoding", "codebook"]) == 0  # ours: replaced
    assert export.main([str(gqz), "-o", str(other), "--force"]) == 0
    assert other.read_bytes() == ours.read_bytes()


# --- checkpoints -----------------------------------------------------------------------------------


def _state(value):
    return {"w": np.full((64, 8), value, np.float32), "step": np.array(value, np.int32)}


def _saved(tmp_path, parent="p0", epochs=(1, 2)):
    store = ckpt.StageCheckpoints(tmp_path, "retrain", parent)
    for epoch in epochs:
        store.save(epoch, _state(epoch))
    store.close()
    return tmp_path / "checkpoints" / "retrain"


def _biggest_file(step: pathlib.Path) -> pathlib.Path:
    return max(
        (p for p in step.rglob("*") if p.is_file() and p.name != ckpt.META), key=lambda p: p.stat().st_size
    )


def _flip(path: pathlib.Path):
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x04
    path.write_bytes(bytes(raw))


DAMAGE = {
    "flipped byte in an array file": lambda step: _flip(_biggest_file(step)),
    "truncated manifest": lambda step: next(step.rglob("manifest.ocdbt")).write_bytes(b"\x00" * 7),
    "missing metadata file": lambda step: (step / "_CHECKPOINT_METADATA").unlink(),
    "missing digest": lambda step: (step / ckpt.META).unlink(),
}


@pytest.mark.parametrize("how", list(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys, how):
    directory = _saved(tmp_path)
    DAMAGE[how](directory / "2")
    store = ckpt.StageCheckpoints(tmp_path, "retrain", "p0")
    epoch, state = store.restore_latest(_state(0))
    store.close()
    assert epoch == 1
    np.testing.assert_array_equal(state["w"], _state(1)["w"])
    warning = _one_line(capsys.readouterr().err)
    assert "retrain checkpoint 2 is damaged" in warning and "previous" in warning
    assert sorted(p.name for p in directory.iterdir() if p.name.isdigit()) == ["1"]


def test_checkpoints_of_another_starting_point_are_discarded(tmp_path, capsys):
    directory = _saved(tmp_path, parent="pretrained-A")
    store = ckpt.StageCheckpoints(tmp_path, "retrain", "pretrained-B")
    assert store.restore_latest(_state(0)) == (0, None)
    store.close()
    assert "different starting point" in capsys.readouterr().err
    assert not any(p.name.isdigit() for p in directory.iterdir()) if directory.exists() else True


def test_nothing_good_left_starts_the_stage_afresh(tmp_path):
    directory = _saved(tmp_path)
    for step in ("1", "2"):
        _flip(_biggest_file(directory / step))
    store = ckpt.StageCheckpoints(tmp_path, "retrain", "p0")
    assert store.restore_latest(_state(0)) == (0, None)
    store.close()


def test_non_finite_state_is_not_restored(tmp_path):
    store = ckpt.StageCheckpoints(tmp_path, "retrain", "p0")
    store.save(1, _state(1))
    store.save(2, {"w": np.full((64, 8), np.nan, np.float32), "step": np.array(2, np.int32)})
    assert store.restore_latest(_state(0))[0] == 1
    store.close()


def test_bit_flipped_newest_retrain_checkpoint_resumes_to_the_same_result(reference, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(reference, workdir)
    newest = max((workdir / "checkpoints" / "retrain").iterdir(), key=lambda p: int(p.name))
    _flip(_biggest_file(newest))
    code, _out, err = _run(workdir)
    assert code == 0, err
    assert f"retrain checkpoint {newest.name} is damaged" in _one_line(err)
    assert _metrics(workdir) == _metrics(reference)


# --- one run per work directory --------------------------------------------------------------------


def test_lock_refuses_a_second_holder_and_takes_over_a_stale_one(tmp_path):
    (tmp_path / wd.LOCK).write_text("pid 999999 on host gone (since yesterday)\n")  # a dead process's
    with wd.Lock(tmp_path):
        assert f"pid {os.getpid()}" in (tmp_path / wd.LOCK).read_text()
        code = "import sys; from gmm_quant import workdir as wd; wd.Lock(sys.argv[1]).__enter__()"
        other = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
        assert other.returncode != 0 and f"in use by pid {os.getpid()}" in other.stderr
    with wd.Lock(tmp_path):  # released on exit
        pass


def test_second_concurrent_run_is_refused_and_the_first_finishes_unharmed(reference, tmp_path):
    workdir = tmp_path / "w"
    first = _popen(workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lock, deadline = workdir / wd.LOCK, time.time() + 120
    while time.time() < deadline and not (lock.exists() and lock.read_text()):
        time.sleep(0.02)
    code, _out, err = _run(workdir)
    assert code == 1 and f"in use by pid {first.pid}" in _one_line(err)
    _out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert _metrics(workdir) == _metrics(reference)


def test_ctrl_c_during_retraining_stops_cleanly_and_resumes_to_the_same_result(reference, tmp_path):
    workdir = tmp_path / "w"
    proc = _popen(workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    steps, deadline = workdir / "checkpoints" / "retrain", time.time() + 240
    while time.time() < deadline and not (
        steps.exists() and any(p.name in "2345678" for p in steps.iterdir())
    ):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=120)
    assert not (workdir / "metrics.json").exists(), "interrupted too late to test resuming"
    assert proc.returncode == 130
    assert _one_line(err) == "interrupted; run the same command to resume"
    code, _out, err = _run(workdir)
    assert code == 0, err
    assert err.strip() == ""  # nothing was damaged: no warning
    assert _metrics(workdir) == _metrics(reference)


# --- errors a user sees ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--tau", "inf"], "'tau' = inf: must be finite"),
        (["--lr-weights", "-inf"], "'lr_weights' = -inf"),
        (["--gamma", "1,nan"], "'gamma' = (1.0, nan): must be finite"),
        (["--grid-bits", "1"], "'grid_bits' = 1: must be 0 (off) or 2..8"),
        (
            ["--batch-size", "5000"],
            "'batch_size' = 5000: exceeds the 1294 training examples left after 144 held out",
        ),
        (
            ["--train-subset", "10"],
            "exceeds the 9 training examples of the train_subset left after 1 held out",
        ),
        (["--pretrain-lr", "-1e-3"], "'pretrain_lr' = -0.001: must be > 0"),
        (["--retrain", "2"], "unrecognized arguments: --retrain 2"),
        (["--pretrained", "nowhere"], "pretrained nowhere: neither a .gqz file nor a work directory"),
    ],
)
def test_bad_values_are_refused_in_one_line_before_anything_is_created(tmp_path, capsys, flags, message):
    workdir = tmp_path / "w"
    try:
        code = train.main(["--config", "tiny", "--workdir", str(workdir), "--no-progress", *flags])
    except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code
    assert code != 0
    assert message in _one_line(capsys.readouterr().err)
    assert not workdir.exists()


def test_unreadable_data_is_one_line(tmp_path, capsys, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", "/data/mnist/train-images-idx3-ubyte.gz")

    monkeypatch.setattr(data, "load", denied)
    assert train.main(["--config", "tiny", "--workdir", str(tmp_path / "w"), "--no-progress"]) == 1
    line = _one_line(capsys.readouterr().err)
    assert "permission denied: /data/mnist/train-images-idx3-ubyte.gz" in line


def test_full_disk_while_writing_outputs_keeps_the_old_ones(reference, tmp_path, capsys, monkeypatch):
    workdir = tmp_path / "w"
    shutil.copytree(reference, workdir)
    before = _snapshot(workdir)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    argv = ["--config", "tiny", "--workdir", str(workdir), "--no-progress", "--retrain-epochs", "8"]
    assert train.main(argv) == 1
    line = _one_line(capsys.readouterr().err)
    assert "no space left on device" in line and "run the same command again" in line
    after = _snapshot(workdir)
    assert {k: v for k, v in after.items() if k != wd.LOCK} == {
        k: v for k, v in before.items() if k != wd.LOCK
    }


def test_full_disk_while_checkpointing_is_one_line(tmp_path, capsys, monkeypatch):
    def full(self, epoch, state):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.directory))

    monkeypatch.setattr(ckpt.StageCheckpoints, "save", full)
    assert train.main(["--config", "tiny", "--workdir", str(tmp_path / "w"), "--no-progress"]) == 1
    assert "no space left on device" in _one_line(capsys.readouterr().err)


def test_diverging_training_names_the_stage_and_epoch(tmp_path, capsys):
    argv = ["--config", "tiny", "--workdir", str(tmp_path / "w"), "--no-progress"]
    assert train.main([*argv, "--lr-log-precisions", "1e5", "--lr-weights", "10"]) == 1
    assert "training diverged in retrain epoch 1: non-finite" in _one_line(capsys.readouterr().err)


def test_debug_shows_the_traceback(tmp_path):
    a_file = tmp_path / "f"
    a_file.write_text("x")
    result = subprocess.run(
        [*CLI, "--workdir", str(a_file), "--debug"], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode != 0 and "Traceback" in result.stderr and "WorkdirError" in result.stderr


def test_pretrained_path_is_only_read(reference, tmp_path):
    before = _snapshot(reference)
    workdir = tmp_path / "w"
    code, _out, err = _run(workdir, "--pretrained", str(reference), "--pretrain-epochs", "0")
    assert code == 0, err
    assert _snapshot(reference) == before
    assert _metrics(workdir)["error_pretrained"] == _metrics(reference)["error_pretrained"]
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    code, _out, err = _run(tmp_path / "w2", "--pretrained", str(empty))
    assert code == 1 and list(empty.iterdir()) == []


def test_mnist_files_beside_an_empty_mnist_folder_are_found(tmp_path, mnist_dir):
    for name in data.MNIST_FILES:
        os.symlink(mnist_dir / name, tmp_path / name)
    (tmp_path / "mnist").mkdir()
    assert data.load_mnist(tmp_path).y_test.shape == (10000,)
    empty = tmp_path / "elsewhere"
    (empty / "mnist").mkdir(parents=True)
    with pytest.raises(data.DataError, match=f"looked in {empty / 'mnist'} and {empty}"):
        data.load_mnist(empty)


def test_selection_sees_the_validation_split_never_the_test_set(tmp_path, monkeypatch):
    """keep_better (the one selection the run makes) gets the held-out part of the training data."""
    from gmm_quant import pipeline

    seen = []
    real = pipeline.keep_better

    def spy(loss, start, end, data_xy, batch_size=1000):
        seen.append(data_xy)
        return real(loss, start, end, data_xy, batch_size)

    monkeypatch.setattr(pipeline, "keep_better", spy)
    argv = ["--config", "tiny", "--workdir", str(tmp_path / "w"), "--no-progress", "--no-onnx"]
    assert train.main(argv) == 0
    ds = data.load_digits()
    train_part, (x_val, y_val) = data.split_validation(ds, 0.1, 0)
    assert len(seen) == 1 and np.array_equal(seen[0][0], x_val) and np.array_equal(seen[0][1], y_val)
    as_rows = {r.tobytes() for r in x_val.reshape(len(x_val), -1)}
    assert not as_rows & {r.tobytes() for r in train_part.x_train.reshape(len(train_part.x_train), -1)}
    assert not as_rows & {r.tobytes() for r in ds.x_test.reshape(len(ds.x_test), -1)}
    metrics = json.loads((tmp_path / "w" / "metrics.json").read_text())
    assert metrics["validation"] == {"fraction": 0.1, "seed": 0, "examples": 144}
    assert metrics["val_error_finetuned"] == pytest.approx(
        float(np.mean(np.argmax(_predict(tmp_path / "w", x_val), -1) != y_val)), abs=1e-9
    )


def _predict(workdir, x):
    import gmm_quant as gq

    return np.asarray(gq.load_model(workdir / "model.gqz")(x))


def test_a_run_made_before_the_validation_split_still_resumes(tmp_path):
    cfg = cfgm.load("tiny")
    wd.claim(tmp_path, cfg)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["config"]["val_fraction"]  # as written by an earlier version
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(wd.CheckpointMismatch, match="val_fraction"):
        wd.claim(tmp_path, cfg)  # it trained on all the data: resuming with a split would differ
    wd.claim(tmp_path, cfgm.override(cfg, {"val_fraction": "0"}))
