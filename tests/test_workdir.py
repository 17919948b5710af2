"""Nothing of the user's is lost, one run per work directory, other runs only read (issue 9)."""

import os
import shutil
import subprocess
import sys
import time

import pytest
from cli_runs import metrics_of, one_line, popen, run_cli, snapshot

from gmm_quant.cli import export as export_cli
from gmm_quant.cli import train
from gmm_quant.run import configs
from gmm_quant.run import workdir as wd


@pytest.mark.parametrize("overwrite", [True, False])
def test_a_directory_that_is_not_ours_is_refused_and_untouched(tmp_path, capsys, overwrite):
    user = tmp_path / "thesis"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    (user / "model.gqz").write_bytes(b"the user's own file of the same name")
    before = snapshot(user)
    flags = ["--overwrite"] if overwrite else []
    assert train.main(["--config", "tiny", "--workdir", str(user), "--no-progress", *flags]) == 1
    line = one_line(capsys.readouterr().err)
    assert str(user) in line and "not a gmm_quant work directory" in line
    assert snapshot(user) == before


def test_overwrite_deletes_only_what_the_pipeline_wrote(tmp_path):
    workdir = tmp_path / "w"
    wd.claim(workdir, configs.load("tiny"))
    for name in ("metrics.json", "model.gqz", "model.onnx", "weights.png", "scatter.png"):
        (workdir / name).write_bytes(b"output")
    for name in ("study.db", "best_config.json", "trials.csv", "pareto.png", "search.json"):  # tune's
        (workdir / name).write_bytes(b"output")
    (workdir / "final" / "checkpoints").mkdir(parents=True)
    (workdir / "checkpoints" / "retrain" / "3").mkdir(parents=True)
    (workdir / "notes.txt").write_text("mine")
    (workdir / "plots").mkdir()
    (workdir / "plots" / "fig.pdf").write_bytes(b"%PDF")
    removed = wd.clear(workdir)
    assert sorted(removed) == sorted(wd.OUTPUTS)
    assert snapshot(workdir) == {"notes.txt": b"mine", "plots/fig.pdf": b"%PDF"}


def test_an_empty_directory_and_an_existing_file_as_workdir(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    wd.check_usable(empty, overwrite=True)  # an empty directory may be used
    a_file = tmp_path / "results.csv"
    a_file.write_text("1,2,3")
    assert train.main(["--config", "tiny", "--workdir", str(a_file), "--no-progress"]) == 1
    assert "is an existing file" in one_line(capsys.readouterr().err)
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
    before = snapshot(work)
    for source in (work, work / "model.gqz"):
        assert export_cli.main([str(source), "-o", str(work / "model.gqz")]) == 1
        assert "over its input" in one_line(capsys.readouterr().err)
    assert snapshot(work) == before


def test_export_overwrites_only_its_own_onnx_files_unless_forced(gqz, tmp_path, capsys):
    other = tmp_path / "report.docx"
    other.write_bytes(b"PK\x03\x04 a document")
    assert export_cli.main([str(gqz), "-o", str(other)]) == 1
    assert "not an ONNX file written by gmm_quant" in one_line(capsys.readouterr().err)
    assert other.read_bytes() == b"PK\x03\x04 a document"
    ours = tmp_path / "m.onnx"
    assert export_cli.main([str(gqz), "-o", str(ours)]) == 0
    assert export_cli.main([str(gqz), "-o", str(ours), "--encoding", "codebook"]) == 0  # ours: replaced
    assert export_cli.main([str(gqz), "-o", str(other), "--force"]) == 0
    assert other.read_bytes() == ours.read_bytes()


# --- checkpoints -----------------------------------------------------------------------------------


def test_lock_refuses_a_second_holder_and_takes_over_a_stale_one(tmp_path):
    (tmp_path / wd.LOCK).write_text("pid 999999 on host gone (since yesterday)\n")  # a dead process's
    with wd.Lock(tmp_path):
        assert f"pid {os.getpid()}" in (tmp_path / wd.LOCK).read_text()
        code = "import sys; from gmm_quant.run import workdir as wd; wd.Lock(sys.argv[1]).__enter__()"
        other = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
        assert other.returncode != 0 and f"in use by pid {os.getpid()}" in other.stderr
    with wd.Lock(tmp_path):  # released on exit
        pass


def test_second_concurrent_run_is_refused_and_the_first_finishes_unharmed(reference, tmp_path):
    workdir = tmp_path / "w"
    first = popen(workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lock, deadline = workdir / wd.LOCK, time.time() + 120
    while time.time() < deadline and not (lock.exists() and lock.read_text()):
        time.sleep(0.02)
    code, _out, err = run_cli(workdir)
    assert code == 1 and f"in use by pid {first.pid}" in one_line(err)
    _out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert metrics_of(workdir) == metrics_of(reference)


def test_pretrained_path_is_only_read(reference, tmp_path):
    before = snapshot(reference)
    workdir = tmp_path / "w"
    code, _out, err = run_cli(workdir, "--pretrained", str(reference), "--pretrain-epochs", "0")
    assert code == 0, err
    assert snapshot(reference) == before
    assert metrics_of(workdir)["error_pretrained"] == metrics_of(reference)["error_pretrained"]
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    code, _out, err = run_cli(tmp_path / "w2", "--pretrained", str(empty))
    assert code == 1 and list(empty.iterdir()) == []
