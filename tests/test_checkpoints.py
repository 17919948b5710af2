"""Checkpoints are verified on restore: damage falls back, a changed start is not resumed, Ctrl-C
saves whole steps (issue 9)."""

import json
import pathlib
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
from cli_runs import metrics_of, one_line, popen, run_cli

from gmm_quant.run import checkpoint as ckpt


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
    warning = one_line(capsys.readouterr().err)
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


def _as_written_before_checksums(step: pathlib.Path, digest: str) -> None:
    meta = json.loads((step / ckpt.META).read_text())
    legacy = {"digest": digest, "parent": meta["parent"], "files": meta["files"]}
    (step / ckpt.META).write_text(json.dumps(legacy))


def test_steps_written_before_checksums_are_verified_by_their_sha256(tmp_path, capsys):
    """Work directories of earlier versions resume: a step whose metadata holds the sha256 ``digest``
    (and a sha256 parent) is checked against it, and refused when it does not match."""
    directory = _saved(tmp_path)
    _as_written_before_checksums(directory / "2", ckpt.tree_digest(_state(2)))
    _as_written_before_checksums(directory / "1", ckpt.tree_digest(_state(0)))  # not what step 1 holds
    store = ckpt.StageCheckpoints(tmp_path, "retrain", "p0")
    epoch, state = store.restore_latest(_state(0))
    assert epoch == 2 and np.array_equal(state["w"], _state(2)["w"])
    store._discard(2)
    assert store.restore_latest(_state(0)) == (0, None)
    store.close()
    assert "retrain checkpoint 1 is damaged: it fails its checksum" in capsys.readouterr().err


def test_bit_flipped_newest_retrain_checkpoint_resumes_to_the_same_result(reference, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(reference, workdir)
    newest = max((workdir / "checkpoints" / "retrain").iterdir(), key=lambda p: int(p.name))
    _flip(_biggest_file(newest))
    code, _out, err = run_cli(workdir)
    assert code == 0, err
    assert f"retrain checkpoint {newest.name} is damaged" in one_line(err)
    assert metrics_of(workdir) == metrics_of(reference)


# --- one run per work directory --------------------------------------------------------------------


def test_ctrl_c_during_retraining_stops_cleanly_and_resumes_to_the_same_result(reference, tmp_path):
    workdir = tmp_path / "w"
    proc = popen(workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    steps, deadline = workdir / "checkpoints" / "retrain", time.time() + 240
    while time.time() < deadline and not (
        steps.exists() and any(p.name in "2345678" for p in steps.iterdir())
    ):
        time.sleep(0.02)
    proc.send_signal(signal.SIGSTOP)  # frozen where it was seen, however loaded the machine: the
    proc.send_signal(signal.SIGINT)  # Ctrl-C is pending when it continues
    proc.send_signal(signal.SIGCONT)
    _out, err = proc.communicate(timeout=120)
    assert not (workdir / "metrics.json").exists(), "interrupted too late to test resuming"
    assert proc.returncode == 130
    assert one_line(err) == "interrupted; run the same command to resume"
    code, _out, err = run_cli(workdir)
    assert code == 0, err
    assert err.strip() == ""  # nothing was damaged: no warning
    assert metrics_of(workdir) == metrics_of(reference)


# --- errors a user sees ----------------------------------------------------------------------------


def test_a_layer_pruned_to_zero_entirely_fine_tunes_and_checkpoints(tmp_path):
    """A codebook of the zero centre alone has no free centre: fine-tuning leaves it out of the
    trainable state (orbax cannot store zero-size arrays), keeps its weights exactly 0 and its codebook."""
    import jax.numpy as jnp

    from gmm_quant.core import codebook_tuning
    from gmm_quant.core.codebook import Codebook

    params = {"a": {"kernel": jnp.zeros((4, 3))}, "b": {"kernel": jnp.ones((4, 3))}}
    codebooks = {
        "a/kernel": Codebook(np.zeros(1, np.float32), np.zeros((4, 3), np.uint8)),
        "b/kernel": Codebook(np.array([0.0, 1.0], np.float32), np.ones((4, 3), np.uint8)),
    }
    trainable, _, build = codebook_tuning.finetune_loss(lambda p, x, y: (0.0, {}), codebooks, params)
    assert list(trainable["centres"]) == ["b/kernel"]
    built = build(trainable)
    assert np.all(np.asarray(built["a"]["kernel"]) == 0.0) and np.all(np.asarray(built["b"]["kernel"]) == 1.0)
    store = ckpt.StageCheckpoints(tmp_path, "finetune", "p0")
    store.save(1, trainable)
    store.close()
    tuned = codebook_tuning.updated_codebooks(codebooks, trainable)
    assert tuned["a/kernel"].centres.tolist() == [0.0] and tuned["b/kernel"].centres.tolist() == [0.0, 1.0]
