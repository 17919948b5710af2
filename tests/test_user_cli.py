"""The command line on a user's own model, data, weights and config (issue 25).

A small user package is written to a temporary directory: a CNN factory with BatchNorm and Dropout
in ``mynet.py``, its data in an ``.npz``, weights it trained itself with its own loop saved as an
Orbax checkpoint and as a ``.safetensors`` file, and a ``get_config()`` file. The commands run there
as the user would run them; hostile inputs end in one line with nothing created.
"""

import json
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import onnxruntime as ort
import optax
import orbax.checkpoint as ocp
import pytest
from cli_runs import one_line
from flax import nnx
from safetensors.numpy import load_file, save_file

import gmm_quant as gq
from gmm_quant.training import data

MYNET = textwrap.dedent(
    """
    from flax import nnx


    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(1, 8, (3, 3), rngs=rngs)
            self.bn = nnx.BatchNorm(8, rngs=rngs)
            self.drop = nnx.Dropout(0.2, rngs=rngs)
            self.out = nnx.Linear(8 * 64, 10, rngs=rngs)

        def __call__(self, x):
            x = self.drop(nnx.relu(self.bn(self.conv(x))))
            return self.out(x.reshape(x.shape[0], -1))


    def make(rngs):
        return Net(rngs)
    """
)
MY_CONFIG = textwrap.dedent(
    """
    import gmm_quant as gq


    def get_config():
        return gq.Config(model="mynet:make", dataset="data.npz", pretrain_epochs=0, retrain_epochs=2,
                         finetune_epochs=1, batch_size=32)
    """
)
FAST = ["--pretrain-epochs", "0", "--retrain-epochs", "3", "--finetune-epochs", "1", "--batch-size", "32"]


def _flat(tree: dict, prefix="") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        out.update(_flat(value, name) if isinstance(value, dict) else {name: np.asarray(value)})
    return out


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """The user's directory, and the test error of their weights by their own evaluation."""
    root = tmp_path_factory.mktemp("user")
    (root / "mynet.py").write_text(MYNET)
    (root / "my_config.py").write_text(MY_CONFIG)
    ds = data.load_digits()
    x_train, x_test = ds.x_train.reshape(-1, 8, 8, 1), ds.x_test.reshape(-1, 8, 8, 1)
    np.savez(root / "data.npz", x_train=x_train, y_train=ds.y_train, x_test=x_test, y_test=ds.y_test)
    sys.path.insert(0, str(root))
    try:
        import mynet

        model = mynet.make(nnx.Rngs(0))
    finally:
        sys.path.remove(str(root))
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()  # noqa: E731
        optimizer.update(model, nnx.grad(loss)(model))

    model.train()
    for _ in range(4):
        for i in range(0, len(x_train) - 31, 32):
            step(model, optimizer, x_train[i : i + 32], ds.y_train[i : i + 32])
    model.eval()
    own_error = float(np.mean(np.argmax(model(x_test), -1) != ds.y_test))
    state = nnx.state(model, nnx.Not(nnx.RngState))  # parameters and BatchNorm statistics
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save((root / "ckpt").resolve(), state)
    save_file(_flat(state.to_pure_dict()), str(root / "weights.safetensors"))
    return root, own_error


def cli(root, command, *args, timeout=600):
    proc = subprocess.run([sys.executable, "-m", f"gmm_quant.{command}", *args], cwd=root,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("weights", ["ckpt", "weights.safetensors"])
def test_train_starts_from_the_users_weights_and_the_file_rebuilds_itself(package, weights):
    root, own_error = package
    workdir = f"w_{weights}"
    code, _out, err = cli(root, "train", "--model", "mynet:make", "--data", "data.npz", "--pretrained",
                         weights, *FAST, "--workdir", workdir, "--no-progress")  # fmt: skip
    assert code == 0, err
    metrics = json.loads((root / workdir / "metrics.json").read_text())
    assert metrics["error_pretrained"] == own_error  # BatchNorm statistics came with the weights
    compressed = gq.load_compressed(root / workdir / "model.gqz")
    assert compressed.model == "mynet:make" and compressed.state is not None
    sys.path.insert(0, str(root))
    try:
        module = gq.load_model(root / workdir / "model.gqz", trust_model=True)
    finally:
        sys.path.remove(str(root))
    x_test, y_test = (np.load(root / "data.npz")[k] for k in ("x_test", "y_test"))
    assert float(np.mean(np.argmax(module(x_test), -1) != y_test)) == pytest.approx(
        metrics["error_finetuned"], abs=1 / len(y_test)
    )
    session = ort.InferenceSession(str(root / workdir / "model.onnx"))
    for batch in (1, 7, 64):
        onnx_out = session.run(None, {"input": x_test[:batch]})[0]
        np.testing.assert_allclose(onnx_out, np.asarray(module(x_test[:batch])), atol=1e-4)


def test_tune_and_export_on_the_users_model(package):
    root, _ = package
    code, _out, err = cli(root, "tune", "--model", "mynet:make", "--data", "data.npz", "--pretrained", "ckpt",
                         "--trials", "2", "--max-error-increase", "3", *FAST, "--workdir", "t",
                         "--no-progress")  # fmt: skip
    assert code == 0, err
    assert (root / "t" / "final" / "model.gqz").is_file()
    code, _, err = cli(root, "export", "t/final/model.gqz", "-o", "t/m.onnx", "--input-shape", "8,8,1")
    assert code == 1 and "--trust-model" in one_line(err)  # the file alone runs no code
    code, _out, err = cli(root, "export", "t/final/model.gqz", "-o", "t/m.onnx", "--input-shape", "8,8,1",
                         "--trust-model")  # fmt: skip
    assert code == 0, err
    assert (root / "t" / "m.onnx").is_file()


def test_a_config_file_of_ones_own(package):
    root, own_error = package
    code, _out, err = cli(root, "train", "--config", "my_config.py", "--pretrained", "ckpt", "--workdir", "c",
                         "--no-progress", "--no-onnx")  # fmt: skip
    assert code == 0, err
    metrics = json.loads((root / "c" / "metrics.json").read_text())
    assert metrics["model"] == "mynet:make" and metrics["error_pretrained"] == own_error
    assert json.loads((root / "c" / "config.json").read_text())["config"]["retrain_epochs"] == 2


def _write_bad(root: pathlib.Path) -> dict:
    """Hostile inputs: {name: (flags, expected words in the one line)}."""
    d = dict(np.load(root / "data.npz"))
    x_nan = d["x_train"].copy()
    x_nan[3, 2, 2, 0] = np.nan
    arrays = {
        "nan": ({**d, "x_train": x_nan}, "x_train holds 1 NaN"),
        "no_y_test": ({k: v for k, v in d.items() if k != "y_test"}, "no array 'y_test'"),
        "float_labels": ({**d, "y_train": d["y_train"].astype(np.float32)}, "not class labels"),
        "test_shape": ({**d, "x_test": d["x_test"].reshape(-1, 64)}, "x_test's examples are shaped (64,)"),
        "counts": ({**d, "y_train": d["y_train"][:-3]}, "y_train 1435 labels"),
        "empty": ({**d, "x_test": d["x_test"][:0], "y_test": d["y_test"][:0]}, "x_test is empty"),
        "labels_beyond_model": ({**d, "y_train": d["y_train"] + 5, "y_test": d["y_test"] + 5}, "10 outputs"),
        "wrong_inputs": (
            {**d, "x_train": d["x_train"].reshape(-1, 64), "x_test": d["x_test"].reshape(-1, 64)},
            "does not run on the examples"),
    }  # fmt: skip
    cases = {}
    for name, (content, words) in arrays.items():
        np.savez(root / f"bad_{name}.npz", **content)
        cases[name] = (["--data", f"bad_{name}.npz"], words)
    (root / "garbage.npz").write_bytes(b"not a zip")
    (root / "garbage.safetensors").write_bytes(b"\0" * 20)
    other = load_file(str(root / "weights.safetensors"))
    other["out.kernel"] = other["out.kernel"][:, :5]
    del other["bn.var"]
    other["extra.thing"] = np.zeros(3, np.float32)
    save_file(other, str(root / "other.safetensors"))
    cases.update({
        "garbage_data": (["--data", "garbage.npz"], "not an .npz file"),
        "missing_data": (["--data", "nothere.npz"], "no such file"),
        "garbage_weights": (["--data", "data.npz", "--pretrained", "garbage.safetensors"], "not a readable"),
        "missing_weights": (["--data", "data.npz", "--pretrained", "nothere.safetensors"], "no such file"),
        "other_weights": (["--data", "data.npz", "--pretrained", "other.safetensors"],
                          "missing bn/var; unexpected extra/thing; mis-shaped out/kernel"),
        "no_factory": (["--data", "data.npz", "--model", "mynet:nothing"], "cannot import"),
        "bad_model_name": (["--data", "data.npz", "--model", "my net"], "unknown model"),
        "missing_config": (["--config", "nothere.py"], "no such file"),
    })  # fmt: skip
    return cases


def test_hostile_inputs_end_in_one_line_and_create_nothing(package, monkeypatch, capsys):
    """In process (the command's ``main``, as ``python -m gmm_quant.train`` calls it), to keep the
    suite short; the subprocess tests above show the same entry point run as a command."""
    from gmm_quant.cli import train

    root, _ = package
    cases = _write_bad(root)
    monkeypatch.chdir(root)
    monkeypatch.syspath_prepend(str(root))
    for name, (flags, words) in cases.items():
        model = [] if "--model" in flags or "--config" in flags else ["--model", "mynet:make"]
        code = train.main([*model, *flags, "--workdir", f"bad_{name}", "--no-progress"])
        line = one_line(capsys.readouterr().err)
        assert code in (1, 2) and words in line, (name, line)
        assert not (root / f"bad_{name}").exists(), name


MYREG = textwrap.dedent(
    """
    from flax import nnx


    def make(rngs):
        return nnx.Sequential(nnx.Linear(10, 64, rngs=rngs), nnx.relu, nnx.Linear(64, 1, rngs=rngs))
    """
)


def test_a_regression_task_reports_rmse_and_searches_within_an_rmse_budget(tmp_path):
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    x, y = ((x - x.mean(0)) / x.std(0)).astype(np.float32), ((y - y.mean()) / y.std()).astype(np.float32)
    np.savez(tmp_path / "reg.npz", x_train=x[:350], y_train=y[:350], x_test=x[350:], y_test=y[350:])
    (tmp_path / "myreg.py").write_text(MYREG)
    flags = ["--model", "myreg:make", "--data", "reg.npz", "--task", "regress", "--pretrain-epochs", "20",
             "--retrain-epochs", "6", "--finetune-epochs", "2", "--batch-size", "32",
             "--no-progress"]  # fmt: skip
    code, out, err = cli(tmp_path, "train", *flags, "--workdir", "r")
    assert code == 0, err
    assert "test RMSE: pretrained" in out
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["task"] == "regress" and "error_finetuned" not in metrics
    sys.path.insert(0, str(tmp_path))
    try:
        module = gq.load_model(tmp_path / "r" / "model.gqz", trust_model=True)
    finally:
        sys.path.remove(str(tmp_path))
    rmse = float(np.sqrt(np.mean((np.asarray(module(x[350:]))[:, 0] - y[350:]) ** 2)))
    assert rmse == pytest.approx(metrics["rmse_finetuned"], rel=1e-5)

    code, out, err = cli(tmp_path, "tune", *flags, "--trials", "2", "--max-rmse-increase", "200",
                         "--workdir", "t")  # fmt: skip
    assert code == 0, err
    assert "RMSE rise %" in out and "test RMSE" in out
    summary = json.loads((tmp_path / "t" / "search.json").read_text())
    assert summary["metric"] == "rmse" and summary["final"]["rmse_finetuned"] > 0


def test_a_second_run_on_changed_data_is_refused_and_the_first_kept(package):
    from cli_runs import snapshot

    root, _ = package
    arrays = dict(np.load(root / "data.npz"))
    np.savez(root / "mine.npz", **arrays)
    flags = ["--model", "mynet:make", "--data", "mine.npz", "--pretrained", "ckpt", *FAST, "--no-onnx",
             "--no-progress", "--workdir", "same"]  # fmt: skip
    code, _, err = cli(root, "train", *flags)
    assert code == 0, err
    before = snapshot(root / "same")
    np.savez(root / "mine.npz", **{**arrays, "y_train": arrays["y_train"][::-1].copy()})  # same name
    code, _, err = cli(root, "train", *flags)
    assert code == 1 and "trained on other data" in one_line(err)
    assert snapshot(root / "same") == before
