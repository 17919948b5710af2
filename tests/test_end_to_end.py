"""The library end to end on real data, and the README's example exactly as written."""

import pathlib
import re

import numpy as np
from flax import nnx

import gmm_quant as gq
import models
from gmm_quant.training import data, loop

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_mnist_subset_pretrain_retrain_compress_finetune(mnist_dir):
    """LeNet-300-100 on 10,000 MNIST images: < 1 minute on 2 CPU cores."""
    ds = data.load("mnist", mnist_dir, train_subset=10000)
    train, x_test, y_test = (ds.x_train, ds.y_train), ds.x_test[:2000], ds.y_test[:2000]
    graphdef, params = nnx.split(models.create("lenet300_100"), nnx.Param)

    def apply(p, x):
        return nnx.merge(graphdef, p)(x)

    params = gq.pretrain(apply, params, train, epochs=10, batch_size=64)
    error_pretrained = loop.error_rate(apply, params, x_test, y_test)
    plan = gq.make_plan(params, mixture=gq.MixtureConfig(zero_gamma=(5000.0, 2.0), gamma=(250.0, 0.1)))
    mixtures, params = gq.retrain(
        apply, params, train, plan, tau=7e-3, warmup_epochs=3, epochs=30, batch_size=64
    )
    codebooks, snapped = gq.compress(plan, mixtures, params)
    codebooks, final = gq.finetune(apply, codebooks, snapped, train, epochs=5, batch_size=64)
    error_final = loop.error_rate(apply, final, x_test, y_test)

    assert error_final <= error_pretrained + 0.015
    indices = np.concatenate([cb.indices.ravel() for cb in codebooks.values()])
    assert np.mean(indices == 0) >= 0.70
    for cb in codebooks.values():
        assert len(cb.centres) - 1 <= 16 and cb.centres[0] == 0.0


def test_readme_example_runs_as_written(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- example:start -->\n```python\n(.*?)```\n<!-- example:end -->", text, re.S).group(
        1
    )
    assert len([line for line in block.splitlines() if line.strip()]) <= 20
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)
    loaded = gq.load_compressed(tmp_path / "net.gqz")
    restored = loaded.params(namespace["params"])
    for name, leaf in gq.core.rules.flatten(namespace["params"]).items():
        np.testing.assert_array_equal(np.asarray(gq.core.rules.flatten(restored)[name]), np.asarray(leaf))
    assert set(loaded.codebooks) == {"hidden/kernel", "out/kernel"}
