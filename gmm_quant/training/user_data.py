"""Data of one's own: an ``.npz`` file, a ``package.module:loader``, or a Hugging Face ``datasets``
directory, checked before any training.

    load_user_data("data.npz")                 # arrays x_train, y_train, x_test, y_test (x_val, y_val)
    load_user_data("mypkg.data:load")          # load() returns a dict (or an object) of those arrays
    load_user_data("hf_dir/", columns=("image", "label"))  # DatasetDict.save_to_disk: train, test

Checks (``check``), each refused in one line naming the array and the problem (``DataError``): every
required array present and non-empty, as many labels as examples, numbers only, no NaN or infinity,
every split's examples shaped alike, and for classification integer labels >= 0 with no test label
the training set never shows. A validation split given with the data is used as it is; otherwise the
run holds one out of the training data (``data.split_validation``).
"""

from __future__ import annotations

import importlib
import pathlib
import zipfile

import numpy as np

from gmm_quant.training.data import DataError, Dataset

REQUIRED = ("x_train", "y_train", "x_test", "y_test")
OPTIONAL = ("x_val", "y_val")
TASKS = ("classify", "regress", "sequence")
SPLITS = {"train": "train", "test": "test", "validation": "val"}  # Hugging Face split -> ours


def is_loader_spec(spec: str) -> bool:
    """``package.module:function`` (not a path: no slash, and the part after ':' an identifier)."""
    module, sep, attr = spec.partition(":")
    plain = module.replace(".", "").replace("_", "")
    return bool(sep) and "/" not in spec and plain.isalnum() and attr.isidentifier()


def load_user_data(spec: str, *, task: str = "classify", columns=("x", "y")) -> Dataset:
    """The checked arrays of ``spec`` (see the module docstring) as a ``Dataset``."""
    path = pathlib.Path(spec)
    if is_loader_spec(spec) and not path.exists():
        arrays = _from_loader(spec)
    elif path.is_dir():
        arrays = _from_hugging_face(path, columns)
    elif path.suffix == ".npz" or path.is_file():
        arrays = _from_npz(path)
    else:
        raise DataError(f"data {spec!r}: no such file or directory, and not a package.module:loader")
    return check(arrays, task, spec)


def _from_npz(path: pathlib.Path) -> dict:
    if not path.is_file():
        raise DataError(f"data {path}: no such file")
    if not zipfile.is_zipfile(path):
        raise DataError(f"data {path}: not an .npz file (numpy.savez writes one)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except (OSError, ValueError, EOFError) as err:
        raise DataError(f"data {path}: not a readable .npz file ({err})") from None


def _from_loader(spec: str) -> dict:
    module, _, attr = spec.partition(":")
    try:
        loader = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise DataError(f"data {spec!r}: cannot import it ({err})") from None
    result = loader()
    if not isinstance(result, dict):
        result = {name: getattr(result, name) for name in REQUIRED + OPTIONAL if hasattr(result, name)}
    return result


def _from_hugging_face(path: pathlib.Path, columns) -> dict:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"data {path}: a directory is read as a Hugging Face datasets directory, which needs "
            "`pip install datasets` (or give an .npz file)"
        ) from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as err:
        raise DataError(f"data {path}: not a datasets directory written by save_to_disk ({err})") from None
    if not isinstance(loaded, datasets.DatasetDict):
        raise DataError(f"data {path}: one split only; save a DatasetDict with 'train' and 'test' splits")
    x_col, y_col = columns
    arrays = {}
    for split, ours in SPLITS.items():
        if split not in loaded:
            continue
        table = loaded[split].with_format("numpy")
        for col, prefix in ((x_col, "x"), (y_col, "y")):
            if col not in table.column_names:
                raise DataError(
                    f"data {path}: split {split!r} has no column {col!r} (has {table.column_names})"
                )
            arrays[f"{prefix}_{ours}"] = np.asarray(table[col])
    return arrays


def check(arrays: dict, task: str, source: str) -> Dataset:
    """``arrays`` as a Dataset after every check of the module docstring; ``DataError`` otherwise."""
    if task not in TASKS:
        raise DataError(f"task {task!r}: choose one of {TASKS}")
    missing = [name for name in REQUIRED if name not in arrays]
    if missing:
        raise DataError(f"data {source}: no array {missing[0]!r} (has {sorted(arrays)})")
    if ("x_val" in arrays) != ("y_val" in arrays):
        raise DataError(f"data {source}: x_val and y_val come together")
    names = [n for n in REQUIRED + OPTIONAL if n in arrays]
    out = {n: _numbers(np.asarray(arrays[n]), n, source) for n in names}
    for split in ("train", "test", "val"):
        if f"x_{split}" in out:
            _check_split(out, split, source)
    shape = out["x_train"].shape[1:]
    for split in ("test", "val"):
        if f"x_{split}" in out and out[f"x_{split}"].shape[1:] != shape:
            raise DataError(
                f"data {source}: x_{split}'s examples are shaped {out[f'x_{split}'].shape[1:]}, "
                f"x_train's {shape}"
            )
    if task == "sequence" and out["y_train"].ndim != 2:
        raise DataError(f"data {source}: y_train is shaped {out['y_train'].shape}, not [examples, positions]")
    if task in ("classify", "sequence"):
        _check_labels(out, source)
    else:  # regression targets
        out.update({n: out[n].astype(np.float32) for n in ("y_train", "y_test", "y_val") if n in out})
    return Dataset(*(out[n] for n in REQUIRED), out.get("x_val"), out.get("y_val"))


def _numbers(a: np.ndarray, name: str, source: str) -> np.ndarray:
    if a.dtype.kind not in "biuf":
        raise DataError(f"data {source}: {name} holds {a.dtype} values, not numbers")
    if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
        bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
        raise DataError(f"data {source}: {name} holds {bad} NaN or infinite values")
    return a.astype(np.float32) if a.dtype.kind == "f" and a.dtype != np.float32 else a


def _check_split(out: dict, split: str, source: str) -> None:
    x, y = out[f"x_{split}"], out[f"y_{split}"]
    if x.ndim == 0 or len(x) == 0:
        raise DataError(f"data {source}: x_{split} is empty")
    if y.ndim == 0 or len(y) != len(x):
        raise DataError(f"data {source}: x_{split} has {len(x)} examples, y_{split} {np.size(y)} labels")


def _check_labels(out: dict, source: str) -> None:
    for name in ("y_train", "y_test", "y_val"):
        if name not in out:
            continue
        y = out[name]
        if y.dtype.kind == "f":
            raise DataError(f"data {source}: {name} holds {y.dtype} values, not class labels")
        if y.min() < 0:
            raise DataError(f"data {source}: {name} holds the negative label {int(y.min())}")
        out[name] = y.astype(np.int32)
    top = int(out["y_train"].max())
    for name in ("y_test", "y_val"):
        if name in out and int(out[name].max()) > top:
            raise DataError(
                f"data {source}: {name} holds label {int(out[name].max())}, which y_train never shows "
                f"(its largest is {top})"
            )
