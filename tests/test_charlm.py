"""The character language model (issue 11 part 6): data, causality, perplexity, compression, export."""

import json

import numpy as np
import onnxruntime as ort
import pytest
from flax import nnx
from scipy.special import logsumexp

import gmm_quant as gq
import models
from gmm_quant.cli import train
from gmm_quant.formats import export
from gmm_quant.training import data, loop


def _decode(codes) -> str:
    return bytes(np.asarray(codes, np.uint8)).decode("ascii")


def test_windows_are_the_text_shifted_by_one_and_the_test_set_is_its_end():
    from pydoc_data.topics import topics

    text = "".join(topics[k] for k in sorted(topics)).encode("ascii", "replace").decode("ascii")
    ds = data.load_pydoc_chars()
    n = data.CONTEXT + 1
    assert ds.x_train.shape[1] == ds.y_train.shape[1] == data.CONTEXT
    for i in (0, 17, len(ds.x_train) - 1):
        assert _decode(ds.x_train[i]) + _decode(ds.y_train[i][-1:]) == text[i * n : (i + 1) * n]
    np.testing.assert_array_equal(ds.x_train[:, 1:], ds.y_train[:, :-1])
    start = len(ds.x_train) * n  # the test windows follow the training ones in the text
    assert _decode(ds.x_test[0]) == text[start : start + data.CONTEXT]
    assert len(ds.x_test) == round(0.1 * (len(text) // n))


def test_the_model_is_causal_a_token_changes_only_later_predictions():
    model = models.create("charlm_tiny", 0)
    tokens = np.random.default_rng(0).integers(0, 128, size=(2, 64)).astype(np.int32)
    changed = tokens.copy()
    changed[:, 40] = (changed[:, 40] + 1) % 128
    a, b = np.asarray(model(tokens)), np.asarray(model(changed))
    np.testing.assert_array_equal(a[:, :40], b[:, :40])
    assert np.abs(a[:, 40:] - b[:, 40:]).min(axis=-1).max() > 0  # every later position sees it
    with pytest.raises(ValueError, match="longer than the context of 64"):
        model(np.zeros((1, 65), np.int32))


def test_perplexity_is_exp_of_the_mean_token_cross_entropy():
    graphdef, params = nnx.split(models.create("charlm_tiny", 1), nnx.Param)
    ds = data.load_pydoc_chars()
    x, y = ds.x_test[:50], ds.y_test[:50]

    def apply_fn(p, v):
        return nnx.merge(graphdef, p)(v)

    logits = np.asarray(apply_fn(params, x), np.float64)
    nll = logsumexp(logits, axis=-1) - np.take_along_axis(logits, y[..., None], -1)[..., 0]
    assert loop.perplexity(apply_fn, params, x, y, batch_size=16) == pytest.approx(
        np.exp(nll.mean()), rel=1e-5
    )


def _run(session, x, batch):
    outs = [session.run(None, {"input": x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    return np.concatenate(outs)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("charlm") / "w"
    argv = [
        "--config",
        "charlm_tiny",
        "--workdir",
        str(workdir),
        "--no-progress",
        "--activation-mode",
        "w8a8",
    ]
    assert train.main(argv) == 0
    return workdir


def test_compression_reports_perplexity_of_every_stage(tiny_run):
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    for split in ("", "val_"):
        for stage in ("pretrained", "retrained", "compressed", "activations_quantised", "finetuned"):
            assert metrics[f"{split}perplexity_{stage}"] > 1.0
    # the run learnt something: far below the 128-way uniform guess
    assert metrics["perplexity_finetuned"] < 40


def test_w8a8_language_model_export_matches_the_fake_quantised_model_per_position(tiny_run):
    apply_fn, params, _, _ = export.load_model_file(tiny_run / "model.gqz")
    x = data.load_pydoc_chars().x_test[:64]
    session = ort.InferenceSession(str(tiny_run / "model.onnx"), providers=["CPUExecutionProvider"])
    ref = np.asarray(apply_fn(params, x))
    step = (ref.max() - ref.min()) / 255
    for batch in (1, 7):
        ours = np.concatenate(
            [session.run(None, {"input": x[i : i + batch]})[0] for i in range(0, 64, batch)]
        )
        assert ours.shape == ref.shape == (64, 64, 128)
        within = np.abs(ours - ref).max(axis=-1) <= step
        assert within.mean() >= 0.99, (batch, float(np.abs(ours - ref).max()), step)
        assert np.mean(ours.argmax(-1) == ref.argmax(-1)) >= 0.99


def test_codebook_language_model_export_matches_jax_at_batch_1_and_7(tiny_run, tmp_path):
    loaded = gq.load_compressed(tiny_run / "model.gqz")
    graphdef, like = nnx.split(models.create("charlm_tiny", 0), nnx.Param)
    params = loaded.params(like)

    def apply_fn(p, v):
        return nnx.merge(graphdef, p)(v)

    x = data.load_pydoc_chars().x_test[:35]
    session = export.session(export.to_onnx(apply_fn, params, loaded.codebooks, x[:8], encoding="grid"))
    ref = np.asarray(apply_fn(params, x))
    for batch in (1, 7):
        ours = np.concatenate(
            [session.run(None, {"input": x[i : i + batch]})[0] for i in range(0, 35, batch)]
        )
        assert np.abs(ours - ref).max() <= 1e-4, batch
        assert np.array_equal(ours.argmax(-1), ref.argmax(-1)), batch


def test_a_perplexity_budget_search_records_the_rise_its_final_model_reproduces(tmp_path, capsys):
    from gmm_quant.cli import tune

    workdir = tmp_path / "t"
    argv = ["--config", "charlm_tiny", "--max-perplexity-increase", "5", "--trials", "1", "--workdir",
            str(workdir), "--no-progress", "--dimensions", "tau", "--pretrain-epochs", "2",
            "--retrain-epochs", "1"]  # fmt: skip
    assert tune.main(argv) == 0
    summary = json.loads((workdir / "search.json").read_text())
    final = json.loads((workdir / "final" / "metrics.json").read_text())
    assert summary["metric"] == "perplexity" and summary["limit_val_error"] == pytest.approx(0.05)
    rise = final["val_perplexity_finetuned"] / final["val_perplexity_pretrained"] - 1
    assert summary["best_val_error"] == pytest.approx(rise, abs=1e-4)  # the trial, re-run as the final model
    assert "ppl rise %" in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:  # one budget, not two
        tune.main([*argv[:2], "--max-error-increase", "1", *argv[2:]])
    assert refused.value.code == 2
