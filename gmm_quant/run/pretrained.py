"""Pretrained weights: another work directory's pretraining, a ``.gqz`` file, or this run's own; and
the pretrained model with its run's validation split that the analysis commands examine."""

from __future__ import annotations

import pathlib

from flax import nnx

from gmm_quant.formats import foreign, storage
from gmm_quant.run import checkpoint as ckpt
from gmm_quant.run import workdir as wd
from gmm_quant.run.plan import build_plan
from gmm_quant.surgery.model_spec import make_model
from gmm_quant.training import data, loop, pipeline

FRESH_VAL_FRACTION = 0.1  # held out for runs made before the validation split existed


def load_pretrained(path, like):
    """Params from another work directory's finished pretraining, a ``.gqz`` file, or weights of the
    user's own training (``pretrained_weights``); read only."""
    return pretrained_weights(path, like)[0]


def pretrained_weights(path, like, state=None):
    """``(params, state)`` of ``path``: a ``.gqz`` file, a ``.safetensors`` / ``.msgpack`` file or an
    Orbax checkpoint directory (``formats.foreign``: matched by path, BatchNorm statistics included),
    or another work directory's pretraining. ``state``: the model's non-parameter variables (None
    for a model without); those the source lacks keep the model's values."""
    path = pathlib.Path(path)
    if path.suffix in (".safetensors", ".msgpack") or _is_orbax(path):
        if not path.exists():
            raise FileNotFoundError(f"pretrained {path}: no such file or directory")
        return foreign.match_weights(foreign.read_weights(path), like, state)
    if path.is_file():
        compressed = storage.load_compressed(path)
        return compressed.params(like), (None if state is None else compressed.restore_state(state))
    return _workdir_weights(path, like, state)


def _is_orbax(path: pathlib.Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in ("_METADATA", "_CHECKPOINT_METADATA"))


def _workdir_weights(path: pathlib.Path, like, state):
    if not (path / "checkpoints" / "pretrain").is_dir():
        raise FileNotFoundError(
            f"pretrained {path}: neither a .gqz file, a work directory with a pretraining, nor "
            f"weights of your own ({foreign.KINDS})"
        )
    restored = pretrained_state(path, like, state)
    if restored is None:
        raise FileNotFoundError(f"pretrained {path}: no intact pretraining checkpoint in it")
    return restored.trainable, restored.model_state


def pretrained_params(workdir, like):
    """The params of a work directory's newest intact pretraining checkpoint (None if there is none)."""
    restored = pretrained_state(workdir, like)
    return None if restored is None else restored.trainable


def pretrained_state(workdir, like, model_state=None):
    """The newest intact pretraining checkpoint's ``TrainState`` (None if there is none), restored
    through the optimiser state its config used (a cosine schedule adds a step count); with
    ``model_state`` (a model's statistics) the checkpoint's own."""
    saved = wd.saved_config(workdir)
    cosine = saved.pretrain_cosine and saved.pretrain_epochs
    _, optimizer, _ = pipeline.pretrain_setup(None, like, total_steps=1 if cosine else 0)
    store = ckpt.StageCheckpoints(workdir, "pretrain", read_only=True)
    _epoch, state = store.restore_latest(loop.init_state(like, optimizer, model_state))
    store.close()
    return state


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
