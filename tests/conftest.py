import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def mnist_dir():
    path = SHARED_DATA / "mnist"
    if not (path / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"MNIST files expected in {path} (see ../shared/data/README.md)")
    return path
