"""Layer reuse (issue 13, parts 2-3): one matrix object serves several layers, in JAX, the .gqz and ONNX."""

import itertools
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import pytest
from cli_runs import ROOT, one_line
from flax import nnx

import gmm_quant as gq
from gmm_quant.cli import train
from gmm_quant.core import accounting
from gmm_quant.core.rules import flatten
from gmm_quant.formats import export, storage
from gmm_quant.surgery.reuse import layers
from gmm_quant.surgery.reuse.choose import choose
from gmm_quant.surgery.reuse.links import Link, links_from_rules

WIDTH = 64


class Stack(nnx.Module):
    """An input layer, ``depth`` same-shaped hidden layers, an output layer."""

    def __init__(self, depth=4, *, rngs):
        self.inp = nnx.Linear(8, WIDTH, rngs=rngs)
        self.hidden = nnx.List([nnx.Linear(WIDTH, WIDTH, rngs=rngs) for _ in range(depth)])
        self.out = nnx.Linear(WIDTH, 3, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.inp(x))
        for layer in self.hidden:
            h = nnx.tanh(layer(h))
        return self.out(h)


def stack(depth=4, seed=0):
    return Stack(depth, rngs=nnx.Rngs(seed))


def inputs(n=16):
    return jnp.asarray(np.random.default_rng(1).normal(size=(n, 8)), jnp.float32)


def test_the_identity_transform_computes_exactly_the_source_layers_output():
    model = stack()
    h = jnp.asarray(np.random.default_rng(2).normal(size=(5, WIDTH)), jnp.float32)
    layers.attach(model, [Link("hidden/2", "hidden/0")], fitted=False)
    np.testing.assert_array_equal(model.hidden[2](h), model.hidden[0](h))


@pytest.mark.parametrize("rank", [0, 3])
def test_a_channel_scaled_copy_plus_a_rank_r_difference_is_reproduced_by_the_fitted_transform(rank):
    model, rng = stack(), np.random.default_rng(3)
    source = np.asarray(model.hidden[0].kernel[...], np.float64)
    target = source * rng.uniform(0.5, 2, WIDTH) + rng.normal(size=(WIDTH, rank)) @ rng.normal(
        size=(rank, WIDTH)
    )
    model.hidden[1].kernel[...] = jnp.asarray(target, jnp.float32)
    x, before = inputs(), model(inputs())
    layers.attach(model, [Link("hidden/1", "hidden/0", rank)])
    np.testing.assert_allclose(model(x), before, atol=2e-5)


def test_an_attention_projection_reuses_with_a_scale_per_head_and_channel():
    """A query kernel [in, heads, head_dim] that is another's scaled per (head, channel) plus a rank-2
    matrix is reproduced."""
    from models.vit import vit_digits

    vit, rng = vit_digits(rngs=nnx.Rngs(0)), np.random.default_rng(6)
    source = vit.blocks[0].attn.query
    scales = rng.uniform(0.5, 2, source.kernel.shape[1:])
    low = np.einsum("ir,rhd->ihd", rng.normal(size=(32, 2)), rng.normal(size=(2, *scales.shape))) * 0.1
    vit.blocks[1].attn.query.kernel[...] = jnp.asarray(source.kernel[...] * scales + low, jnp.float32)
    x = jnp.asarray(rng.normal(size=(4, 8, 8, 1)), jnp.float32)
    before = vit(x)
    layers.attach(vit, [Link("blocks/1/attn/query", "blocks/0/attn/query", rank=2)])
    np.testing.assert_allclose(vit.blocks[1].attn.query.scale[...], scales, rtol=1e-5)
    np.testing.assert_allclose(vit(x), before, atol=2e-5)


def test_chains_of_reuse_are_refused_in_either_order():
    with pytest.raises(ValueError, match="is a Reused"):
        layers.attach(stack(), [Link("hidden/1", "hidden/0"), Link("hidden/2", "hidden/1")])
    with pytest.raises(ValueError, match="is reused by another layer"):
        layers.attach(stack(), [Link("hidden/2", "hidden/1"), Link("hidden/1", "hidden/0")])


def test_the_reused_matrix_is_one_object_listed_once_in_the_params():
    model = stack()
    layers.attach(model, [Link("hidden/1", "hidden/0"), Link("hidden/3", "hidden/0", 2)])
    assert model.hidden[1].source is model.hidden[0] and model.hidden[3].source is model.hidden[0]
    graphdef, params = nnx.split(model, nnx.Param)
    paths = set(flatten(params))
    assert "hidden/0/kernel" in paths and not {"hidden/1/kernel", "hidden/3/kernel"} & paths
    assert {"hidden/1/scale", "hidden/1/bias", "hidden/3/down", "hidden/3/up"} <= paths
    merged = nnx.merge(graphdef, params)
    assert merged.hidden[1].source.kernel is merged.hidden[0].kernel
    assert layers.links_of(merged) == {
        "hidden/1": Link("hidden/1", "hidden/0"), "hidden/3": Link("hidden/3", "hidden/0", 2)
    }  # fmt: skip


def compressed(depth, reusing, rank=0):
    """(apply_fn, snapped params, codebooks) of ``stack(depth)`` with hidden/1..reusing reusing hidden/0."""
    model, rng = stack(depth), np.random.default_rng(5)
    for layer in model.hidden:  # distinct biases: equal constants would share one ONNX initializer
        layer.bias[...] = jnp.asarray(rng.normal(size=WIDTH), jnp.float32)
    layers.attach(model, [Link(f"hidden/{i}", "hidden/0", rank) for i in range(1, reusing + 1)])
    graphdef, params = nnx.split(model, nnx.Param)
    codebooks = {
        p: gq.core.codebook.make_codebook(v, gq.core.codebook.kmeans_1d(v, 8))
        for p, v in flatten(params).items()
        if p.endswith("kernel")
    }
    return (lambda p, x: nnx.merge(graphdef, p)(x)), gq.core.codebook.dequantize(codebooks, params), codebooks


def test_the_gqz_and_onnx_store_a_reused_matrix_once_and_reload_the_same_model(tmp_path):
    apply_fn, params, codebooks = compressed(4, 3, rank=2)
    path = tmp_path / "m.gqz"
    links = [Link(f"hidden/{i}", "hidden/0", 2) for i in (1, 2, 3)]
    storage.save_compressed(path, codebooks, params, model="tests.test_reuse_layers:stack", reuse=links)
    loaded = storage.load_compressed(path)
    assert loaded.reuse == tuple(links)
    kernels = [p for p in loaded.shapes() if p.startswith("hidden/") and p.endswith("kernel")]
    assert kernels == ["hidden/0/kernel"]
    model = loaded.load_model(trust_model=True)  # the file names a factory of ours
    assert model.hidden[3].source is model.hidden[0]
    np.testing.assert_array_equal(model(inputs()), apply_fn(params, inputs()))
    info = export.export_file(path, tmp_path / "m.onnx", sample=np.asarray(inputs(7)), trust_model=True)
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    shapes = [tuple(t.dims) for t in graph.initializer]
    assert shapes.count((WIDTH, WIDTH)) == 1 and info["max_abs_diff"] <= 1e-4


def test_files_grow_only_by_the_transform_per_reusing_layer(tmp_path):
    """Depth d with every hidden layer after the first reusing it: one more layer adds its scale and bias
    (2 x 64 float32 = 512 bytes of ONNX initializers), never another matrix."""
    sizes = []
    for depth in (2, 3, 4):
        apply_fn, params, codebooks = compressed(depth, depth - 1)
        model = export.to_onnx(apply_fn, params, codebooks, np.asarray(inputs(8)))
        for n in (1, 7):
            export.verify(model, apply_fn, params, np.asarray(inputs(n)))  # ONNX Runtime vs JAX, 1e-4
        init_bytes = sum(onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
        gqz = tmp_path / f"d{depth}.gqz"
        links = [Link(f"hidden/{i}", "hidden/0") for i in range(1, depth)]
        storage.save_compressed(gqz, codebooks, params, model="tests.test_reuse_layers:stack", reuse=links)
        sizes.append((init_bytes, gqz.stat().st_size, len(model.SerializeToString())))
    transform = 2 * WIDTH * 4
    kernel = accounting.layer_cost("k", compressed(2, 0)[2]["hidden/1/kernel"]).han_bits // 8
    for (i0, g0, o0), (i1, g1, o1) in itertools.pairwise(sizes):
        assert i1 - i0 == transform
        assert transform <= g1 - g0 <= transform + 200  # + the header's two leaf entries
        assert transform <= o1 - o0 <= transform + 600 < kernel  # + a few nodes; a matrix costs more


def test_the_han_count_counts_a_shared_matrix_once_and_adds_the_transforms():
    _, params, codebooks = compressed(4, 3)
    summary = accounting.summarize(codebooks, {p: np.asarray(v) for p, v in flatten(params).items()})
    kernels = sum(accounting.layer_cost(p, cb).han_bits for p, cb in codebooks.items())
    floats = sum(np.size(v) for p, v in flatten(params).items() if p not in codebooks)
    assert len([p for p in codebooks if p.startswith("hidden")]) == 1
    assert summary["han_bits"] == kernels + 32 * floats


def test_rules_link_every_match_to_its_source_first_match_wins_and_report_the_unused():
    paths = ["inp", "hidden/0", "hidden/1", "hidden/2", "hidden/3", "out"]
    rules = [r"hidden/[12]$=hidden/0", r"hidden/(\d)$=hidden/0", "nothing$=hidden/0"]
    links, unused = links_from_rules(rules, paths, rank=2)
    assert links == [
        Link("hidden/1", "hidden/0", 2),
        Link("hidden/2", "hidden/0", 2),
        Link("hidden/3", "hidden/0", 2),
    ]
    assert unused == ["nothing$=hidden/0"]


def test_greedy_choice_keeps_exactly_the_links_within_the_budget():
    """hidden/2 is a channel-scaled copy of hidden/0: reusing it changes nothing; every other pair of
    random layers changes the outputs. With a zero budget only that link is kept."""
    model, rng = stack(), np.random.default_rng(4)
    model.hidden[2].kernel[...] = model.hidden[0].kernel[...] * jnp.asarray(
        rng.uniform(0.5, 2, WIDTH), jnp.float32
    )
    x = inputs(64)
    reference = np.asarray(model(x))

    def error(m):  # a stand-in for the validation error: how far the outputs moved
        return float(np.mean(np.abs(np.asarray(m(x)) - reference)) > 1e-4)

    kept, table = choose(model, error, 0.0, pattern="hidden")
    assert kept == [Link("hidden/2", "hidden/0")]
    assert len(table["pairs"]) == 6  # every pair of the four hidden layers, the later reusing the earlier
    assert np.asarray(model(x)) == pytest.approx(reference)  # the model itself is not changed


def vit_tiny(tmp_path, *extra):
    cmd = [sys.executable, "-m", "gmm_quant.train", "--config", "vit_tiny", "--workdir", str(tmp_path / "w"),
           "--no-progress", *extra]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_a_vit_whose_mlps_reuse_block_0_trains_saves_and_exports_with_the_matrices_once(tmp_path):
    rule = r"blocks/1/(mlp_in|mlp_out|attn/query)$=blocks/0/\1"
    proc = vit_tiny(tmp_path, "--reuse", rule, "--reuse-rank", "2", "--distill-alpha", "0.5")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "w" / "metrics.json").read_text())
    assert [(r["target"], r["source"], r["rank"]) for r in metrics["reuse"]] == [
        ("blocks/1/attn/query", "blocks/0/attn/query", 2), ("blocks/1/mlp_in", "blocks/0/mlp_in", 2),
        ("blocks/1/mlp_out", "blocks/0/mlp_out", 2)]  # fmt: skip
    assert "error_reused" in metrics and "layers reusing another's weights" in proc.stdout
    original = sum(
        np.size(v) for v in jax.tree.leaves(nnx.state(gq.load_model(tmp_path / "w" / "model.gqz")))
    )
    unreused = sum(np.size(v) for v in jax.tree.leaves(nnx.state(__import__("models").create("vit_digits", 0),
                                                                 nnx.Param)))  # fmt: skip
    assert metrics["original_bytes"] == 4 * unreused  # the Han count's original: the model before reuse
    assert original < unreused
    loaded = storage.load_compressed(tmp_path / "w" / "model.gqz")
    assert "blocks/1/mlp_in/kernel" not in loaded.shapes() and len(loaded.reuse) == 3
    assert metrics["onnx"]["max_abs_diff"] <= 1e-4  # exported from the file, verified against JAX


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--reuse", "blocks/1/mlp_out$=blocks/0/mlp_in"], "the layers differ in type or shape"),
        (["--reuse", "blocks/0/mlp_in$=blocks/1/mlp_in"], "can only reuse a layer before it"),
        (["--reuse", "blocks/1/mlp_in$=blocks/0/mlp_in", "--reuse-rank", "99"], "rank 99 outside 0..32"),
        (["--reuse", "blocks/1/norm1$=blocks/0/norm1"], "only Linear, LinearGeneral and Conv reuse"),
        (["--reuse", "blocks/1/attn/out$=blocks/0/attn/out", "--reuse-rank", "1"], "input is its last axis"),
        (["--reuse", "zzz=blocks/0/mlp_in"], "matches no layer of the model"),
        (["--reuse", "blocks/1/mlp_in$"], "expected TARGET_REGEX=SOURCE_PATH"),
        (["--reuse", "a=b", "--reuse-budget", "0.3"], "give reuse rules or a reuse budget, not both"),
    ],
)
def test_bad_reuse_settings_are_refused_in_one_line_before_training(tmp_path, capsys, extra, message):
    code = train.main(["--config", "vit_tiny", "--workdir", str(tmp_path / "w"), "--no-progress", *extra])
    assert code != 0 and message in one_line(capsys.readouterr().err)
    assert not (tmp_path / "w").exists()
