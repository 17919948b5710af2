"""Per-layer sensitivity (issue 15, part 3): exact where it must be, on a validation split only."""

import json
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

import gmm_quant as gq
import models
from gmm_quant.analysis import sensitivity
from gmm_quant.core.codebook import kmeans_1d
from gmm_quant.training import data


def test_kmeans_recovers_a_layer_with_k_distinct_values_and_fits_a_hand_case():
    w = np.array([0.0, 0.0, 0.5, 0.5, -0.25, 0.5], np.float32)
    np.testing.assert_array_equal(np.sort(kmeans_1d(w, 3, init="quantile")), [-0.25, 0.0, 0.5])
    two_clusters = np.array([0.0, 0.1, 0.2, 10.0, 10.1, 10.2], np.float32)
    for init in ("quantile", "linear"):
        np.testing.assert_allclose(np.sort(kmeans_1d(two_clusters, 2, init=init)), [0.1, 10.1], atol=1e-6)


def test_zero_smallest_zeroes_that_fraction_by_magnitude():
    w = np.array([-4.0, 0.5, -1.0, 3.0, 0.1, 2.0, -0.2, 5.0, 0.3, -6.0], np.float32)
    out = sensitivity.zero_smallest(w, 0.5)
    assert np.count_nonzero(out) == 5 and set(np.flatnonzero(out)) == {0, 3, 5, 7, 9}
    np.testing.assert_array_equal(sensitivity.zero_smallest(w, 0.0), w)


def test_validation_split_is_disjoint_from_training_and_seeded():
    x, y = np.arange(100).reshape(100, 1), np.arange(100)
    ds = data.Dataset(x, y, x[:0], y[:0])
    part, (_xv, yv) = data.split_validation(ds, 0.1, seed=3)
    yt = part.y_train
    assert len(yv) == 10 and not set(yt) & set(yv) and len(set(yt) | set(yv)) == 100
    assert np.array_equal(data.split_validation(ds, 0.1, seed=3)[1][1], yv)


def test_a_layer_snapped_at_its_own_number_of_distinct_values_costs_nothing():
    ds = data.load_digits()
    graphdef, params = nnx.split(models.create("digits_mlp"), nnx.Param)
    plan = gq.make_plan(params)
    codebooks, snapped = gq.compress(plan, gq.init_mixtures(plan, params), params)
    k = max(len(np.unique(cb.dequantize())) for cb in codebooks.values())

    def apply_fn(p, x):
        return nnx.merge(graphdef, p)(x)

    _train, val = data.split_validation(ds, 0.1)
    result = sensitivity.layer_sensitivity(
        apply_fn, snapped, plan.quantised(), val, ks=(k,), fractions=(0.0,)
    )
    for row in result["layers"].values():
        assert row[f"k={k}"] == result["baseline"] and row["zero 0%"] == result["baseline"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sens") / "w"
    cmd = [
        sys.executable,
        "-m",
        "gmm_quant.train",
        "--config",
        "tiny",
        "--workdir",
        str(workdir),
        "--no-progress",
    ]
    assert subprocess.run(cmd, capture_output=True, text=True).returncode == 0
    return workdir


def test_command_writes_table_json_and_heat_map(tiny_run):
    cmd = [
        sys.executable,
        "-m",
        "gmm_quant.sensitivity",
        str(tiny_run),
        "--ks",
        "3,9",
        "--fractions",
        "0.5,0.9",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    table = json.loads((tiny_run / "sensitivity.json").read_text())
    assert set(table["layers"]) == {"layers/0/kernel", "layers/1/kernel", "layers/2/kernel"}
    assert list(table["layers"]["layers/0/kernel"]) == ["k=3", "k=9", "zero 50%", "zero 90%"]
    assert (tiny_run / "sensitivity.png").stat().st_size > 0
    assert "layers/1/kernel" in result.stdout
    bad = subprocess.run([*cmd[:3], str(tiny_run / "nope")], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1
