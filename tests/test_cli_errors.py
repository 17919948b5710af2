"""Every user error is one line on stderr and a non-zero exit, decided before anything is created;
selection looks at the validation split only (issues 9, 15)."""

import errno
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
from cli_runs import CLI, ROOT, one_line, snapshot

from gmm_quant.cli import train
from gmm_quant.run import checkpoint as ckpt
from gmm_quant.run import config as cfgm
from gmm_quant.run import configs
from gmm_quant.run import workdir as wd
from gmm_quant.training import data


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
        (["--pretrained", "nowhere"], "pretrained nowhere: neither a .gqz file, a work directory"),
        (["--tau", "-1"], "'tau'"),
        (["--num-components", "0"], "'num_components'"),
        (["--model", "resnet"], "'model'"),
        (["--dataset", "cifar"], "'dataset'"),
        (["--assignment", "map"], "'assignment'"),
        (["--pi-zero", "1.5"], "'pi_zero'"),
        (["--retrain-epochs", "two"], "'retrain_epochs'"),
        (["--prune-threshold", "100000"], "'prune_threshold'"),
        (
            ["--task", "regress", "--distill-alpha", "0.5"],
            "'task' = 'regress': distillation is for classifiers",
        ),
    ],
)
def test_bad_values_are_refused_in_one_line_before_anything_is_created(tmp_path, capsys, flags, message):
    workdir = tmp_path / "w"
    try:
        code = train.main(["--config", "tiny", "--workdir", str(workdir), "--no-progress", *flags])
    except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code
    assert code != 0
    assert message in one_line(capsys.readouterr().err)
    assert not workdir.exists()


def test_unreadable_data_isone_line(tmp_path, capsys, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", "/data/mnist/train-images-idx3-ubyte.gz")

    monkeypatch.setattr(data, "load", denied)
    assert train.main(["--config", "tiny", "--workdir", str(tmp_path / "w"), "--no-progress"]) == 1
    line = one_line(capsys.readouterr().err)
    assert "permission denied: /data/mnist/train-images-idx3-ubyte.gz" in line


def test_full_disk_while_writing_outputs_keeps_the_old_ones(reference, tmp_path, capsys, monkeypatch):
    workdir = tmp_path / "w"
    shutil.copytree(reference, workdir)
    before = snapshot(workdir)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    argv = ["--config", "tiny", "--workdir", str(workdir), "--no-progress", "--retrain-epochs", "8"]
    assert train.main(argv) == 1
    line = one_line(capsys.readouterr().err)
    assert "no space left on device" in line and "run the same command again" in line
    after = snapshot(workdir)
    assert {k: v for k, v in after.items() if k != wd.LOCK} == {
        k: v for k, v in before.items() if k != wd.LOCK
    }


def test_full_disk_while_checkpointing_isone_line(tmp_path, capsys, monkeypatch):
    def full(self, epoch, state):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.directory))

    monkeypatch.setattr(ckpt.StageCheckpoints, "save", full)
    assert train.main(["--config", "tiny", "--workdir", str(tmp_path / "w"), "--no-progress"]) == 1
    assert "no space left on device" in one_line(capsys.readouterr().err)


def test_diverging_training_names_the_stage_and_epoch(tmp_path, capsys):
    argv = ["--config", "tiny", "--workdir", str(tmp_path / "w"), "--no-progress"]
    assert train.main([*argv, "--lr-log-precisions", "1e5", "--lr-weights", "10"]) == 1
    assert "training diverged in retrain epoch 1: non-finite" in one_line(capsys.readouterr().err)


def test_debug_shows_the_traceback(tmp_path):
    a_file = tmp_path / "f"
    a_file.write_text("x")
    result = subprocess.run(
        [*CLI, "--workdir", str(a_file), "--debug"], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode != 0 and "Traceback" in result.stderr and "WorkdirError" in result.stderr


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
    from gmm_quant.training import finetuning

    seen = []
    real = finetuning.keep_better

    def spy(loss, start, end, data_xy, batch_size=1000, **kw):
        seen.append(data_xy)
        return real(loss, start, end, data_xy, batch_size, **kw)

    monkeypatch.setattr(finetuning, "keep_better", spy)
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
    cfg = configs.load("tiny")
    wd.claim(tmp_path, cfg)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["config"]["val_fraction"]  # as written by an earlier version
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(wd.CheckpointMismatch, match="val_fraction"):
        wd.claim(tmp_path, cfg)  # it trained on all the data: resuming with a split would differ
    wd.claim(tmp_path, cfgm.override(cfg, {"val_fraction": "0"}))


def test_a_full_disk_inside_orbax_is_one_line_naming_the_directory(tmp_path, capsys, monkeypatch):
    """orbax reports ENOSPC as a ValueError from its writer threads; the user sees the OS error."""
    import orbax.checkpoint as ocp

    def full(self, step, args=None):
        raise ValueError(
            'RESOURCE_EXHAUSTED: Error writing "opt_state" in OCDBT database: Failed to write 388072 bytes '
            "to file 15: No space left on device [os_error_code='28']"
        )

    monkeypatch.setattr(ocp.CheckpointManager, "save", full)
    assert train.main(["--config", "tiny", "--workdir", str(tmp_path / "w"), "--no-progress"]) == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith("error: no space left on device: ") and "checkpoints/pretrain" in line


def test_an_unwritable_output_is_named_not_its_temporary_file(tmp_path, monkeypatch):
    real_open = open

    def read_only(path, mode="r", *args, **kwargs):
        if "w" in mode:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", read_only)
    with pytest.raises(OSError) as err:
        ckpt.write_atomic(tmp_path / "model.onnx", b"x")
    assert err.value.errno == errno.EROFS and err.value.filename == str(tmp_path / "model.onnx")
