"""The command line: validation, data errors, checkpoints (kill and resume), report and metrics."""

import json
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
from cli_runs import popen, run_cli

from gmm_quant.cli import train
from gmm_quant.run import config as cfgm
from gmm_quant.run import configs
from gmm_quant.run.workdir import CheckpointMismatch
from gmm_quant.run.workdir import claim as claim_workdir
from gmm_quant.training import data


def test_unknown_config_name_is_rejected(capsys):
    assert train.main(["--config", "nope"]) == 2
    assert "unknown config 'nope'" in capsys.readouterr().err


def test_every_config_is_valid_and_documented():
    for name in configs.available():
        cfgm.validate(configs.load(name))
        doc = __import__(f"gmm_quant.run.configs.{name}", fromlist=["x"]).__doc__
        assert "Command:" in doc and "Runtime:" in doc and "Expected:" in doc, name


def test_missing_mnist_file_names_the_file_and_checksum(tmp_path, mnist_dir):
    for name in list(data.MNIST_FILES)[1:]:
        shutil.copy(mnist_dir / name, tmp_path / name)
    missing = next(iter(data.MNIST_FILES))
    with pytest.raises(data.DataError, match=f"missing: .*{missing}.*{data.MNIST_FILES[missing]}"):
        data.load_mnist(tmp_path)


def test_corrupt_mnist_file_names_the_file_and_checksum(tmp_path, mnist_dir):
    for name in data.MNIST_FILES:
        shutil.copy(mnist_dir / name, tmp_path / name)
    victim = "t10k-labels-idx1-ubyte.gz"
    raw = bytearray((tmp_path / victim).read_bytes())
    raw[100] ^= 0xFF
    (tmp_path / victim).write_bytes(bytes(raw))
    with pytest.raises(data.DataError, match=f"{victim} is corrupt.*expected {data.MNIST_FILES[victim]}"):
        data.load_mnist(tmp_path)


def test_mnist_loads_from_the_environment_variable(monkeypatch, mnist_dir):
    monkeypatch.setenv(data.ENV_VAR, str(mnist_dir.parent))
    ds = data.load_mnist()
    assert ds.x_train.shape == (60000, 28, 28, 1) and ds.x_test.shape == (10000, 28, 28, 1)
    assert np.bincount(ds.y_test).tolist()[:3] == [980, 1135, 1032]
    assert abs(float(ds.x_train.mean())) < 1e-3


def test_checkpoint_from_another_config_is_refused(tmp_path):
    claim_workdir(tmp_path, configs.load("tiny"))
    other = cfgm.override(configs.load("tiny"), {"tau": "0.5"})
    with pytest.raises(CheckpointMismatch, match=r"different config.*tau"):
        claim_workdir(tmp_path, other)


def test_kill_during_retraining_then_resume_gives_the_same_result(reference, tmp_path):
    proc = popen(tmp_path / "killed", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "killed" / "checkpoints" / "retrain"
    deadline = time.time() + 240
    while time.time() < deadline and not (
        ckpts.exists() and any(p.name.isdigit() and int(p.name) >= 3 for p in ckpts.iterdir())
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "metrics.json").exists(), "killed too late to test resuming"
    code, _out, err = run_cli(tmp_path / "killed")
    assert code == 0, err
    a = json.loads((reference / "metrics.json").read_text())
    b = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    keys = ("error_pretrained", "error_retrained", "error_compressed", "error_finetuned")
    for key in (*keys, "nonzero_fraction", "compression_ratio"):
        assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-6), key
    assert [row["nonzero"] for row in a["layers"]] == [row["nonzero"] for row in b["layers"]]


def test_tiny_job_end_to_end_report_matches_metrics(tmp_path):
    code, out, err = run_cli(tmp_path / "w")
    assert code == 0, err
    workdir = tmp_path / "w"
    metrics = json.loads((workdir / "metrics.json").read_text())
    for key in ("error_pretrained", "error_retrained", "error_compressed", "error_finetuned",
                "nonzero_fraction", "compression_ratio"):  # fmt: skip
        assert key in metrics
    for name in ("model.gqz", "model.onnx", "weights.png", "scatter.png"):
        assert (workdir / name).stat().st_size > 0, name
    table = out
    for row in metrics["layers"]:
        assert set(row) >= {"name", "num_weights", "nonzero", "centres"}
        line = next(line for line in table.splitlines() if line.startswith(row["name"]))
        fields = line.split()
        assert int(fields[1]) == row["num_weights"]
        assert float(fields[2]) == pytest.approx(100 * row["nonzero"] / row["num_weights"], abs=0.006)
        assert int(fields[3]) == row["centres"]
    assert f"{metrics['compression_ratio']:.1f}x" in table
    assert f"finetuned {100 * metrics['error_finetuned']:.2f}%" in table
    assert metrics["nonzero"] == sum(row["nonzero"] for row in metrics["layers"])
    # what the user ships, next to what the Han count claims
    on_disk = {name: (workdir / name).stat().st_size for name in ("model.gqz", "model.onnx")}
    assert f"files on disk: model.gqz {on_disk['model.gqz']:,} bytes" in table
    assert f"model.onnx {on_disk['model.onnx']:,} bytes" in table


def test_grid_bits_keeps_centres_on_a_grid_and_exports_dequantize_linear(tmp_path, capsys):
    from gmm_quant.core import grid
    from gmm_quant.formats import storage

    workdir = tmp_path / "g"
    assert (
        train.main(["--config", "tiny", "--workdir", str(workdir), "--no-progress", "--grid-bits", "4"]) == 0
    )
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics["onnx"]["encoding"] == "grid" and metrics["onnx"]["max_abs_diff"] <= 1e-4
    for cb in storage.load_compressed(workdir / "model.gqz").codebooks.values():
        assert grid.fit(cb.centres) is not None


def test_every_config_flag_explains_itself_from_the_config_fields_documentation():
    """``--help`` of train and tune: one help line per config field, taken from its comment in
    ``Config`` (the one documented source), grouped by stage, with the library default."""
    from gmm_quant.cli import train as train_cli
    from gmm_quant.cli import tune as tune_cli

    docs = cfgm.field_help()
    assert set(docs) == {f.name for f in cfgm.fields()}  # every field documented where it is defined
    assert docs["tau"] == ("stage 2: retraining with the mixture prior",
                           "prior strength; loss = mean task loss + tau / N * complexity")  # fmt: skip
    for parser in (train_cli.parser(), tune_cli.parser()):
        flags = {a.dest[4:]: a for a in parser._actions if a.dest.startswith("set_")}
        assert set(flags) == set(docs)
        for name, action in flags.items():
            assert action.help.startswith(docs[name][1]) and "library default" in action.help, name
        assert not [a.option_strings for a in parser._actions if not a.help]  # every flag has a help line
        titles = {g.title for g in parser._action_groups}
        assert "config: stage 4: codebook fine-tuning (values override --config's)" in titles
