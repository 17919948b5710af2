"""Pretrained weights: another work directory's pretraining, a ``.gqz`` file, or this run's own; and
the pretrained model with its run's validation split that the analysis commands examine."""

from __future__ import annotations

import pathlib

from flax import nnx

from gmm_quant.formats import storage
from gmm_quant.run import checkpoint as ckpt
from gmm_quant.run import workdir as wd
from gmm_quant.run.plan import build_plan
from gmm_quant.surgery.model_spec import make_model
from gmm_quant.training import data, loop, pipeline

FRESH_VAL_FRACTION = 0.1  # held out for runs made before the validation split existed


def load_pretrained(path, like):
    """Params from another work directory's finished pretraining, or a ``.gqz`` file (read only)."""
    path = pathlib.Path(path)
    if path.is_file():
        return storage.load_compressed(path).params(like)
    if not (path / "checkpoints" / "pretrain").is_dir():
        raise FileNotFoundError(
            f"pretrained {path}: neither a .gqz file nor a work directory with a pretraining"
        )
    params = pretrained_params(path, like)
    if params is None:
        raise FileNotFoundError(f"pretrained {path}: no intact pretraining checkpoint in it")
    return params


def pretrained_params(workdir, like):
    """The params of a work directory's newest intact pretraining checkpoint (None if there is none),
    restored through the optimiser state its config used (a cosine schedule adds a step count)."""
    saved = wd.saved_config(workdir)
    cosine = saved.pretrain_cosine and saved.pretrain_epochs
    _, optimizer, _ = pipeline.pretrain_setup(None, like, total_steps=1 if cosine else 0)
    store = ckpt.StageCheckpoints(workdir, "pretrain", read_only=True)
    _epoch, state = store.restore_latest(loop.init_state(like, optimizer))
    store.close()
    return None if state is None else state.trainable


def pretrained_model(workdir: pathlib.Path, data_dir=None, pretrained=None):
    """``(apply_fn, params, quantised paths, val)`` of a run's pretrained model (or of ``pretrained``,
    a ``.gqz`` file or another work directory) with the run's validation split: what the analysis
    commands (this one, ``gmm_quant.reuse``) examine."""
    cfg = wd.saved_config(workdir)
    graphdef, like = nnx.split(make_model(cfg.model, cfg.seed), nnx.Param)
    if pretrained is not None:
        params = load_pretrained(pretrained, like)
    else:
        params = pretrained_params(workdir, like)
        if params is None:
            raise FileNotFoundError(f"{workdir}: no intact pretraining checkpoint")
    ds = data.load(cfg.dataset, data_dir, cfg.train_subset or None)
    # the run's own held-out split; runs made before it existed (val_fraction 0) get a fresh 10%,
    # which they have trained on
    _ds, val = data.split_validation(ds, cfg.val_fraction or FRESH_VAL_FRACTION, cfg.seed)

    def apply_fn(p, x):
        return nnx.merge(graphdef, p)(x)

    return apply_fn, params, build_plan(cfg, params).quantised(), val
