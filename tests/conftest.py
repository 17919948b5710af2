import pathlib

import pytest
from cli_runs import run_cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def mnist_dir():
    path = SHARED_DATA / "mnist"
    if not (path / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"MNIST files expected in {path} (see ../shared/data/README.md)")
    return path


@pytest.fixture(scope="session")
def digits():
    """The digits MLP pretrained for 5 epochs, with its training and validation splits: what the
    search tests compress."""
    from flax import nnx

    import models
    from gmm_quant.training import data, pipeline

    ds, val = data.split_validation(data.load("digits"), 0.1, 0)
    graphdef, params = nnx.split(models.create("digits_mlp", 0), nnx.Param)

    def apply_fn(p, x):
        return nnx.merge(graphdef, p)(x)

    params = pipeline.pretrain(apply_fn, params, (ds.x_train, ds.y_train), epochs=5, batch_size=64)
    return apply_fn, params, (ds.x_train, ds.y_train), val


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """One finished tiny run, uninterrupted: what every resumed or repaired run must equal."""
    workdir = tmp_path_factory.mktemp("ref") / "w"
    code, _out, err = run_cli(workdir)
    assert code == 0, err
    return workdir


# --- data loss -------------------------------------------------------------------------------------
