"""Reuse candidates (issue 13, part 1): the scales and similarity are least squares, the table is exact."""

import numpy as np
import pytest
from flax import nnx

import models
from gmm_quant.cli import reuse as reuse_cli
from gmm_quant.core.rules import flatten, replace_leaves
from gmm_quant.surgery import reuse
from gmm_quant.training import data, loop


def test_a_channel_scaled_copy_is_fully_similar_and_its_scales_are_recovered():
    rng = np.random.default_rng(0)
    source = rng.normal(size=(32, 4, 8))
    scales = rng.uniform(-2, 2, size=8)
    np.testing.assert_allclose(reuse.output_scales(source * scales, source), scales, rtol=1e-12)
    assert reuse.similarity(source * scales, source) == pytest.approx(1.0, abs=1e-12)
    assert abs(reuse.similarity(rng.normal(size=(32, 4, 8)), source)) < 0.1  # unrelated: about 0


def test_scales_are_the_per_channel_least_squares_solution():
    rng = np.random.default_rng(1)
    target, source = rng.normal(size=(50, 6)), rng.normal(size=(50, 6))
    expected = [np.linalg.lstsq(source[:, [j]], target[:, j], rcond=None)[0][0] for j in range(6)]
    np.testing.assert_allclose(reuse.output_scales(target, source), expected, rtol=1e-10)
    residual = target - source * np.asarray(expected)
    assert reuse.similarity(target, source) == pytest.approx(1 - np.sum(residual**2) / np.sum(target**2))


def test_the_table_covers_every_same_shaped_pair_and_its_errors_are_the_replaced_models():
    graphdef, params = nnx.split(models.create("vit_digits", 0), nnx.Param)
    ds = data.load("digits")
    val = (ds.x_test[:200], ds.y_test[:200])

    def apply_fn(p, x):
        return nnx.merge(graphdef, p)(x)

    paths = [p for p in flatten(params) if p.endswith("kernel") and p.startswith("blocks")]
    result = reuse.reuse_table(apply_fn, params, paths, val, evaluate=3)
    shapes = {p: np.shape(flatten(params)[p]) for p in paths}
    same = sum(shapes[a] == shapes[b] for a in paths for b in paths if a != b)
    assert len(result["pairs"]) == same
    assert [r["similarity"] for r in result["pairs"]] == sorted(
        (r["similarity"] for r in result["pairs"]), reverse=True
    )
    for r in result["pairs"][:3]:
        t, b = flatten(params)[r["target"]], np.asarray(flatten(params)[r["source"]])
        replaced = replace_leaves(params, {r["target"]: (b * reuse.output_scales(t, b)).astype(np.float32)})
        assert r["error"] == loop.error_rate(apply_fn, replaced, *val)
    assert "error" not in result["pairs"][3]


def test_the_command_refuses_a_directory_that_is_not_a_run_in_one_line(tmp_path, capsys):
    assert reuse_cli.main([str(tmp_path)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a gmm_quant work directory" in err[0]
    assert list(tmp_path.iterdir()) == []
