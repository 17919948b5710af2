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
def reference(tmp_path_factory):
    """One finished tiny run, uninterrupted: what every resumed or repaired run must equal."""
    workdir = tmp_path_factory.mktemp("ref") / "w"
    code, _out, err = run_cli(workdir)
    assert code == 0, err
    return workdir


# --- data loss -------------------------------------------------------------------------------------
