"""One source of defaults (issue 23): the Python API and the command line train a model alike."""

import inspect
import json

from flax import nnx

import gmm_quant as gq
import models
from gmm_quant.cli import train as train_cli
from gmm_quant.formats import export
from gmm_quant.run import configs
from gmm_quant.run.config import Config
from gmm_quant.training import data


def test_the_api_takes_the_command_lines_defaults():
    cfg = Config()

    def default(fn, name):
        return inspect.signature(fn).parameters[name].default

    assert default(gq.pretrain, "epochs") == cfg.pretrain_epochs
    assert default(gq.pretrain, "learning_rate") == cfg.pretrain_lr
    for fn in (gq.pretrain, gq.retrain, gq.finetune):
        assert default(fn, "batch_size") == cfg.batch_size, fn
        assert default(fn, "seed") == cfg.seed, fn
    assert default(gq.retrain, "tau") == cfg.tau
    assert default(gq.retrain, "warmup_epochs") == cfg.warmup_epochs
    assert default(gq.retrain, "epochs") == cfg.retrain_epochs
    assert (default(gq.retrain, "tightness") or 0.0) == cfg.retrain_tightness  # off in both
    rates = default(gq.retrain, "rates")
    assert tuple(rates) == (cfg.lr_weights, cfg.lr_means, cfg.lr_log_precisions, cfg.lr_mixing)
    assert default(gq.finetune, "epochs") == cfg.finetune_epochs
    assert default(gq.finetune, "learning_rate") == cfg.finetune_lr
    mixture = gq.MixtureConfig()
    assert (mixture.num_components, mixture.pi_zero, mixture.zero_gamma, mixture.gamma) == (
        cfg.num_components, cfg.pi_zero, cfg.zero_gamma, cfg.gamma,
    )  # fmt: skip
    for fn in (export.to_onnx, export.export_onnx, export.export_file):
        assert default(fn, "encoding") == export.ENCODING == "sparse", fn


def test_the_default_pipeline_gives_the_same_metrics_from_python_and_the_command_line(tmp_path):
    """The tiny config (library defaults but for its epoch counts) through ``python -m gmm_quant.train``
    and through gq.pretrain -> gq.retrain -> gq.compress -> gq.finetune on the same training split,
    selection on the same validation split: the same test errors and compression ratio, exactly."""
    cfg = configs.load("tiny")
    argv = ["--config", "tiny", "--workdir", str(tmp_path / "w"), "--no-progress", "--no-onnx"]
    assert train_cli.main(argv) == 0
    metrics = json.loads((tmp_path / "w" / "metrics.json").read_text())

    ds, val = data.split_validation(data.load(cfg.dataset), cfg.val_fraction, cfg.seed)
    train, test = (ds.x_train, ds.y_train), (ds.x_test, ds.y_test)
    graphdef, params = nnx.split(models.create(cfg.model, cfg.seed), nnx.Param)

    def apply(p, x):
        return nnx.merge(graphdef, p)(x)

    params = gq.pretrain(apply, params, train, epochs=cfg.pretrain_epochs)
    assert gq.error_rate(apply, params, *test) == metrics["error_pretrained"]
    plan = gq.make_plan(params)
    mixtures, params = gq.retrain(apply, params, train, plan, epochs=cfg.retrain_epochs,
                                  warmup_epochs=cfg.warmup_epochs)  # fmt: skip
    assert gq.error_rate(apply, params, *test) == metrics["error_retrained"]
    codebooks, snapped = gq.compress(plan, mixtures, params)
    codebooks, final = gq.finetune(apply, codebooks, snapped, train, epochs=cfg.finetune_epochs, val=val)
    assert gq.error_rate(apply, final, *test) == metrics["error_finetuned"]
    assert gq.summarize(codebooks, final)["compression_ratio"] == metrics["compression_ratio"]


def test_retrain_with_tightness_none_trains_exactly_its_epochs():
    ds = data.load_digits()
    graphdef, params = nnx.split(models.create("digits_mlp", 0), nnx.Param)
    epochs = []
    gq.retrain(lambda p, x: nnx.merge(graphdef, p)(x), params, (ds.x_train[:256], ds.y_train[:256]),
               gq.make_plan(params), epochs=2, warmup_epochs=1, tightness=None,
               on_epoch=lambda e, s, m: epochs.append(e))  # fmt: skip
    assert epochs == [0, 1]


def test_a_file_records_only_the_changed_fields_and_they_rebuild_the_config():
    from gmm_quant.run import config as cfgm
    from gmm_quant.run import configs

    for cfg in (cfgm.Config(), configs.load("vit_mnist"), cfgm.Config(keep_float=("a$",), tau=0.3)):
        changed = cfgm.changed_fields(cfg)
        assert cfgm.Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in changed.items()}) == cfg
        assert {"model", "dataset"} <= set(changed)
        assert all(getattr(cfgm.Config(), k) != getattr(cfg, k) for k in set(changed) - {"model", "dataset"})
