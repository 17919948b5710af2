"""What a run starts from: the model (a project model or the user's ``package.module:factory``) and the
data (a built-in dataset or the user's: ``training.user_data``), each checked against the other
before anything is trained or written."""

from __future__ import annotations

import hashlib

import jax
import numpy as np
from flax import nnx

from gmm_quant.run import config as cfgm
from gmm_quant.run.preflight import check_model
from gmm_quant.surgery.model_spec import make_model
from gmm_quant.training import data, modes, user_data

STRUCTURAL = ("head_threshold", "head_ratio", "reuse", "reuse_budget", "activation_mode", "distill_features")


def build_model(cfg: cfgm.Config):
    """``(apply_fn, params, graphdef)`` of ``cfg.model``. A model with state or randomness (BatchNorm,
    Dropout) is a ``modes.Stateful`` (trained in train mode; graphdef None), which the structural
    stages (heads, reuse, activation quantisation, feature distillation) do not take."""
    module = make_model(cfg.model, cfg.seed)  # a factory the user names on the command line is trusted
    if not has_state(module):
        graphdef, params = nnx.split(module, nnx.Param)
        check_model(cfg, graphdef, params)
        return (lambda p, x: nnx.merge(graphdef, p)(x)), params, graphdef
    used = [f for f in STRUCTURAL if getattr(cfg, f) != getattr(cfgm.Config(), f)]
    if used:
        raise cfgm.ConfigError(
            f"config field {used[0]!r} needs a model without state; {cfg.model} has BatchNorm "
            "statistics or random streams"
        )
    apply_fn, params = modes.from_nnx(module)
    return apply_fn, params, None


def has_state(module) -> bool:
    """Whether an NNX module has variables besides its parameters (statistics, random streams)."""
    return bool(jax.tree.leaves(nnx.state(module, nnx.Not(nnx.Param))))


def load_data(cfg: cfgm.Config, data_dir=None) -> data.Dataset:
    """The built-in dataset ``cfg.dataset`` names, or the user's (a file, a directory or a loader)."""
    if cfg.dataset in data.DATASETS:
        return data.load(cfg.dataset, data_dir, cfg.train_subset or None)
    ds = user_data.load_user_data(cfg.dataset, task=cfg.task, columns=cfg.data_columns)
    if cfg.train_subset:
        ds = ds._replace(x_train=ds.x_train[: cfg.train_subset], y_train=ds.y_train[: cfg.train_subset])
    return ds


def check_fits(cfg: cfgm.Config, apply_fn, params, ds: data.Dataset) -> None:
    """The model runs on the data's examples and has an output for every class label (a regression
    model: outputs shaped as the targets, or with a trailing axis of 1 for scalar targets)."""
    try:
        out = jax.eval_shape(apply_fn, params, ds.x_train[:1])
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise data.DataError(
            f"model {cfg.model} does not run on the examples of {cfg.dataset} (shaped "
            f"{tuple(ds.x_train.shape[1:])}): {first}"
        ) from None
    if cfg.task == "regress":
        target = tuple(ds.y_train.shape[1:])
        if tuple(out.shape[1:]) not in (target, (*target, 1)):
            raise data.DataError(
                f"model {cfg.model} gives outputs shaped {tuple(out.shape[1:])} per example, the targets "
                f"are shaped {target}"
            )
        return
    top = int(np.max(ds.y_train))
    if out.shape[-1] <= top:
        raise data.DataError(
            f"model {cfg.model} gives {out.shape[-1]} outputs per example, but y_train holds label {top}"
        )


def data_digest(cfg: cfgm.Config, ds: data.Dataset, val) -> str | None:
    """sha256 of the user's arrays (None for a built-in dataset, which its name fixes): a work directory
    resumes only on the data it was trained on."""
    if cfg.dataset in data.DATASETS:
        return None
    digest = hashlib.sha256()
    for array in (ds.x_train, ds.y_train, ds.x_test, ds.y_test, *val):
        digest.update(str(array.shape).encode() + np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()
