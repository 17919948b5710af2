"""The package's shape (issue 23): layers that import only the layers below them, no cycles, no
private names across modules, and an ``import gmm_quant`` that loads no heavy optional library."""

import ast
import pathlib
import shutil
import subprocess
import sys

import pytest

import gmm_quant as gq

PACKAGE = pathlib.Path(gq.__file__).parent
ROOT = PACKAGE.parent


def test_the_import_contracts_hold():
    """import-linter reads every import statement (function-local ones too) against pyproject's
    contracts: layers, no cycles between siblings, the maths free of flax/orbax/onnx/optuna."""
    exe = shutil.which("lint-imports", path=str(pathlib.Path(sys.executable).parent))
    if exe is None:
        pytest.skip("import-linter is not installed (the test extra installs it)")
    out = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def _imports(path: pathlib.Path):
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gmm_quant"):
            yield module, node.module, [a.name for a in node.names], node.lineno


def test_no_module_imports_another_modules_private_name():
    offences = []
    for path in PACKAGE.rglob("*.py"):
        for module, source, names, line in _imports(path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            private += [p for p in source.split(".") if p.startswith("_") and p != "_util"]
            if private and source != module:
                offences.append(f"{module}:{line} takes {private} from {source}")
    assert not offences, offences


def test_the_layering_check_sees_an_upward_import(tmp_path):
    """The contract is not vacuous: a copy of the package in which the maths imports the run layer
    inside a function breaks it."""
    exe = shutil.which("lint-imports", path=str(pathlib.Path(sys.executable).parent))
    if exe is None:
        pytest.skip("import-linter is not installed (the test extra installs it)")
    shutil.copytree(PACKAGE, tmp_path / "gmm_quant", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    mixture = tmp_path / "gmm_quant" / "core" / "mixture.py"
    mixture.write_text(
        mixture.read_text() + "\n\ndef _late():\n    from gmm_quant.run import workdir  # noqa\n"
    )
    out = subprocess.run([exe, "--no-cache"], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(tmp_path), "PATH": ""})  # fmt: skip
    assert out.returncode != 0
    assert "gmm_quant.core.mixture -> gmm_quant.run.workdir" in out.stdout


def test_import_gmm_quant_loads_no_heavy_library():
    code = (
        "import sys, gmm_quant as gq; gq.Config; gq.pretrain; gq.save_compressed; "
        "heavy = {'orbax', 'optuna', 'onnx', 'onnxruntime', 'matplotlib'}; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_every_public_name_resolves_and_the_maths_lives_in_core():
    for name in gq.__all__:
        assert getattr(gq, name) is not None, name
    assert gq.init_mixture is gq.core.init_mixture is gq.core.mixture.init_mixture
    assert not {n for n in gq.core.__all__ if not hasattr(gq.core, n)}
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        gq.nonsense  # noqa: B018
