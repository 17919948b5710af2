"""Datasets: MNIST from the official IDX files (checksum-verified) and scikit-learn's 8x8 digits.

MNIST is read from a directory holding the four standard ``.gz`` files, named by ``data_dir`` or the
``GMM_QUANT_DATA`` environment variable (either the ``mnist`` folder itself or its parent). Every file's
sha256 is checked against the official file. When files are missing and no directory was given, they
are downloaded into ``~/.cache/gmm_quant/mnist`` (verified before use); where there is no network the
error names the missing file and where to put it.

Images come as float32 ``[N, H, W, 1]`` normalised with the training set's mean and std; labels int32.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pathlib
import urllib.request
from typing import NamedTuple

import numpy as np

ENV_VAR = "GMM_QUANT_DATA"
MNIST_FILES = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}
MNIST_URL = "https://storage.googleapis.com/cvdf-datasets/mnist/"
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
DATASETS = ("digits", "mnist", "pydoc_chars")
CONTEXT = 64  # characters per sequence of the text dataset
VOCAB = 128  # ASCII codes; other characters become "?"


class Dataset(NamedTuple):
    """Training and test arrays; ``x_val``/``y_val`` a validation split given with the data (else None:
    ``split_validation`` holds one out of the training data)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None


class DataError(RuntimeError):
    """A data file is missing, corrupt or does not parse."""


def sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def mnist_dir(data_dir=None) -> pathlib.Path | None:
    """The directory holding the MNIST files: ``data_dir``, else ``$GMM_QUANT_DATA``, else None.

    Both ``ROOT/mnist`` and ``ROOT`` itself are looked in; the one holding more of the four files wins
    (``ROOT/mnist`` on a tie), so an empty ``mnist/`` folder beside the files does not hide them.
    """
    root = data_dir or os.environ.get(ENV_VAR)
    if not root:
        return None
    root = pathlib.Path(root).expanduser()
    candidates = [root / "mnist", root]
    return max(candidates, key=lambda d: sum((d / name).is_file() for name in MNIST_FILES))


def _download(directory: pathlib.Path, name: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{name}.part"
    try:
        urllib.request.urlretrieve(MNIST_URL + name, tmp)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise DataError(
            f"MNIST file {name} is missing and could not be downloaded ({err}); put the official "
            f"files in a directory and name it (data_dir, or --data-dir on the command line) or set {ENV_VAR}"
        ) from None
    os.replace(tmp, directory / name)


def _verified(directory: pathlib.Path, name: str, download: bool) -> pathlib.Path:
    path = directory / name
    expected = MNIST_FILES[name]
    if not path.is_file():
        if not download:
            other = directory.parent if directory.name == "mnist" else directory / "mnist"
            where = f"{directory} and {other}"
            raise DataError(f"MNIST file missing: {path} (looked in {where}; expected sha256 {expected})")
        _download(directory, name)
    actual = sha256(path)
    if actual != expected:
        raise DataError(
            f"MNIST file {path} is corrupt: sha256 {actual}, expected {expected}; "
            "replace it with the official file"
        )
    return path


def _read_idx(path: pathlib.Path, magic: int, dims: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    header = np.frombuffer(raw[: 4 * (dims + 1)], ">u4")
    if header.size != dims + 1 or header[0] != magic:
        raise DataError(f"{path} is not an IDX file with magic {magic:#010x}")
    shape = tuple(int(d) for d in header[1:])
    data = np.frombuffer(raw[4 * (dims + 1) :], np.uint8)
    if data.size != np.prod(shape):
        raise DataError(f"{path}: header says {shape}, file holds {data.size} values")
    return data.reshape(shape)


def load_mnist(data_dir=None) -> Dataset:
    """MNIST (60,000 train / 10,000 test) from ``data_dir`` or ``$GMM_QUANT_DATA`` or the cache."""
    directory = mnist_dir(data_dir)
    download = directory is None
    if directory is None:
        directory = pathlib.Path.home() / ".cache" / "gmm_quant" / "mnist"
    paths = {name: _verified(directory, name, download) for name in MNIST_FILES}

    def images(name):
        x = _read_idx(paths[name], 0x803, 3).astype(np.float32) / 255.0
        return ((x - MNIST_MEAN) / MNIST_STD)[..., None]

    def labels(name):
        return _read_idx(paths[name], 0x801, 1).astype(np.int32)

    return Dataset(
        images("train-images-idx3-ubyte.gz"),
        labels("train-labels-idx1-ubyte.gz"),
        images("t10k-images-idx3-ubyte.gz"),
        labels("t10k-labels-idx1-ubyte.gz"),
    )


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 images), split by ``seed``; no network needed."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = (bunch.images.astype(np.float32) / 16.0 - 0.5)[..., None] / 0.5
    y = bunch.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = round(test_fraction * len(y))
    test, train = order[:n_test], order[n_test:]
    return Dataset(x[train], y[train], x[test], y[test])


def load_pydoc_chars(context: int = CONTEXT, test_fraction: float = 0.1) -> Dataset:
    """Python's own help topics (``pydoc_data.topics``, about 0.46 MB of English) as ASCII codes, cut
    into non-overlapping windows of ``context + 1`` characters: ``x`` is a window's first ``context``
    codes, ``y`` the next character at every position (``int32 [N, context]`` both). The test set is
    the last ``test_fraction`` of the text (topics in sorted order), so no test window overlaps a
    training one. Ships with every CPython: no download."""
    from pydoc_data.topics import topics

    text = "".join(topics[k] for k in sorted(topics))
    codes = np.frombuffer(text.encode("ascii", "replace"), np.uint8).astype(np.int32)
    windows = codes[: len(codes) // (context + 1) * (context + 1)].reshape(-1, context + 1)
    n_test = round(test_fraction * len(windows))
    train, test = windows[:-n_test], windows[-n_test:]
    return Dataset(train[:, :-1], train[:, 1:], test[:, :-1], test[:, 1:])


def random_inputs(name, count: int = 64, seed: int = 0) -> np.ndarray:
    """``count`` random inputs shaped like dataset ``name``'s: character codes for text, else images
    (28x28, or 8x8 for digits). What an export is verified on when no real sample is given."""
    rng = np.random.default_rng(seed)
    if name == "pydoc_chars":
        return rng.integers(0, VOCAB, size=(count, CONTEXT)).astype(np.int32)
    shape = (8, 8, 1) if name == "digits" else (28, 28, 1)
    return rng.normal(size=(count, *shape)).astype(np.float32)


def split_validation(ds: Dataset, fraction: float, seed: int = 0) -> tuple[Dataset, tuple]:
    """``(ds with the training part only, (x_val, y_val))``: the validation examples are the last
    ``fraction`` of a permutation of the training set seeded by ``seed`` (none when ``fraction`` is 0).
    The test set is untouched: it is only ever reported, never used to choose. A validation split that
    came with the data (``ds.x_val``) is used as it is."""
    if ds.x_val is not None:
        return ds._replace(x_val=None, y_val=None), (ds.x_val, ds.y_val)
    if fraction <= 0:
        return ds, (ds.x_train[:0], ds.y_train[:0])
    order = np.random.default_rng(seed).permutation(len(ds.y_train))
    n_val = max(1, round(fraction * len(order)))
    train, val = np.sort(order[:-n_val]), np.sort(order[-n_val:])
    return ds._replace(x_train=ds.x_train[train], y_train=ds.y_train[train]), (
        ds.x_train[val],
        ds.y_train[val],
    )


def load(name: str, data_dir=None, train_subset: int | None = None) -> Dataset:
    """Dataset by name (see ``DATASETS``), optionally the first ``train_subset`` examples."""
    if name == "digits":
        ds = load_digits()
    elif name == "pydoc_chars":
        ds = load_pydoc_chars()
    elif name == "mnist":
        ds = load_mnist(data_dir)
    else:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")
    if train_subset:
        ds = ds._replace(x_train=ds.x_train[:train_subset], y_train=ds.y_train[:train_subset])
    return ds
