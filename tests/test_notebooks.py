"""Every notebook runs headless, top to bottom, with small settings; a failing cell fails the test."""

import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_three_notebooks_committed_without_outputs():
    assert [p.stem[:2] for p in NOTEBOOKS] == ["01", "02", "03"]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), path.name
        # no logic defined only in a notebook: no functions or classes beyond a model and its apply
        source = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
        assert source.count("\ndef ") <= 1, path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, tmp_path, mnist_dir, monkeypatch):
    monkeypatch.setenv("GMM_QUANT_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("GMM_QUANT_DATA", str(mnist_dir.parent))
    nb = nbformat.read(path, as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    assert os.listdir(tmp_path)  # the notebook wrote its results
