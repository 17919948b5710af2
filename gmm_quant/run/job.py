"""``train_and_evaluate(config, workdir)``: the whole pipeline with checkpoints, report and files.

Stages: pretrain -> retrain with the prior -> compress -> fine-tune the codebooks -> evaluate -> save
``model.gqz``, ``metrics.json``, figures (and ``model.onnx`` when onnx is installed). Every epoch of
every training stage is checkpointed; running the same command again resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import pathlib
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from gmm_quant.core import accounting, codebook, unit_prior
from gmm_quant.core.rules import flatten, replace_leaves
from gmm_quant.formats import storage
from gmm_quant.run import checkpoint as ckpt
from gmm_quant.run import config as cfgm
from gmm_quant.run import inputs, model_stages, report, stages
from gmm_quant.run import workdir as wd
from gmm_quant.run.plan import build_plan
from gmm_quant.run.pretrained import pretrained_weights
from gmm_quant.scale import distributed
from gmm_quant.training import data, loop, modes, pipeline


def run_stage(workdir, name, setup, data_xy, cfg, epochs, progress, parent=None, placement=None, stop=None,
              model_state=None):  # fmt: skip
    """Train one stage with verified per-epoch checkpoints; resumes from the newest good one.

    ``parent`` keys the checkpoints to what the stage started from (default: the identity of its
    initial trainable state), so a changed earlier stage never resumes a later one's old steps.
    Several processes: all of them save and restore together, each its own shards of the global state
    (``checkpoint.StageCheckpoints``); the trained state comes back as global arrays.
    """
    loss, optimizer, trainable = setup
    state = loop.init_state(trainable, optimizer, model_state)  # a model's state is checkpointed with it
    if placement is not None:  # restored straight into place (several processes: into global arrays)
        state = placement.place(state)
    parent = parent or ckpt.Identity(state.trainable)
    writer = distributed.is_writer()
    store = ckpt.StageCheckpoints(workdir, name, parent)
    done, restored = store.restore_latest(state)
    state = restored if restored is not None else state
    if stop is not None and done and stop(done - 1, state):  # resumed where the stage had stopped
        store.close()
        return state
    bar = tqdm(total=epochs, initial=done, desc=name, disable=not (progress and writer), unit="epoch")

    def on_epoch(epoch, st, metrics):
        store.save(epoch + 1, st)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics.get('accuracy', float('nan')):.4f}")
        bar.update()

    try:
        return pipeline.run_epochs(
            loss, optimizer, trainable, data_xy, epochs=epochs, batch_size=cfg.batch_size, seed=cfg.seed,
            name=name, state=state, start_epoch=done, on_epoch=on_epoch, placement=placement, stop=stop,
        )  # fmt: skip
    finally:
        bar.close()
        store.close()


def _hold_workdir(stack: contextlib.ExitStack, workdir: pathlib.Path, cfg: cfgm.Config, overwrite: bool,
                  data_digest=None):  # fmt: skip
    """Lock, clear (``overwrite``) and claim ``workdir`` until ``stack`` closes. Several processes:
    process 0 does it and all stop if it may not; then every process must see the same directory."""

    def enter():
        stack.enter_context(wd.Lock(workdir))
        if overwrite:
            wd.clear(workdir)
        wd.claim(workdir, cfg, data_digest)

    distributed.agree(enter)
    if not distributed.sees_shared(workdir):
        raise wd.WorkdirError(
            f"work directory {workdir} is not shared by the {jax.process_count()} processes: each writes "
            "its shards of every checkpoint there; put it on a filesystem every host mounts (e.g. NFS)"
        )


def _check_processes_agree(cfg: cfgm.Config, ds: data.Dataset) -> None:
    """Several processes must run one program on one dataset: compare the config and the labels."""
    if not distributed.multi_process():
        return
    labels = hashlib.sha256(np.ascontiguousarray(ds.y_train).tobytes() + np.asarray(ds.y_test).tobytes())
    shapes = f"{ds.x_train.shape} {ds.x_test.shape}"
    if not distributed.same_everywhere(f"{cfg.fingerprint()} {shapes} {labels.hexdigest()}"):
        raise cfgm.ConfigError(
            f"the {jax.process_count()} processes were not given the same config and data: run the same "
            "command (config, flags, --data-dir contents) on each"
        )


def check_data(cfg: cfgm.Config, ds: data.Dataset, n_val: int) -> None:
    n = ds.x_train.shape[0]
    if cfg.batch_size > n:
        raise cfgm.ConfigError(
            f"invalid config field 'batch_size' = {cfg.batch_size}: exceeds the {n} training examples"
            + (" of the train_subset" if cfg.train_subset else "")
            + (f" left after {n_val} held out for validation" if n_val else "")
        )
    for name in ("x_train", "x_test"):
        if not np.all(np.isfinite(getattr(ds, name))):
            raise data.DataError(f"the {cfg.dataset} data hold non-finite values in {name}")


def train_and_evaluate(
    cfg: cfgm.Config,
    workdir,
    *,
    data_dir=None,
    pretrained=None,
    progress=True,
    overwrite=False,
    export_onnx=True,
) -> dict:
    """Run every stage of ``cfg`` in ``workdir``; returns the metrics written to metrics.json.

    Everything is checked before the work directory is touched: the config, the data, ``pretrained``
    and the directory itself (see ``workdir.py``: a directory that is not ours is never written to,
    ``overwrite`` deletes only our outputs, and one process at a time holds the directory).
    """
    cfgm.validate(cfg)
    cfg = dataclasses.replace(cfg, mesh=distributed.default_mesh(cfg.mesh))  # several processes: data=N
    workdir = pathlib.Path(workdir)
    distributed.agree(lambda: wd.check_usable(workdir, overwrite=overwrite))
    apply_fn, params, graphdef = inputs.build_model(cfg)
    plan = build_plan(cfg, params)
    flat = flatten(params)
    cfgm.check_threshold(cfg, {p: int(np.size(flat[p])) for p in plan.quantised()})
    ds, val = data.split_validation(inputs.load_data(cfg, data_dir), cfg.val_fraction, cfg.seed)
    check_data(cfg, ds, len(val[1]))
    inputs.check_fits(cfg, apply_fn, params, ds)
    if pretrained is not None:
        params, state = pretrained_weights(pretrained, params, modes.state_of(apply_fn))
        apply_fn = modes.with_state(apply_fn, state)

    _check_processes_agree(cfg, ds)

    writer = distributed.is_writer()  # several processes: process 0 alone holds the lock and the files
    with contextlib.ExitStack() as stack:
        _hold_workdir(stack, workdir, cfg, overwrite, inputs.data_digest(cfg, ds, val))

        def runner(name, setup, epochs, parent, stop=None, placement=None, model_state=None):
            return run_stage(workdir, name, setup, train, cfg, epochs, progress, parent, placement, stop,
                             model_state)  # fmt: skip

        train, test = (ds.x_train, ds.y_train), (ds.x_test, ds.y_test)
        ctx = stages.Context(cfg, train, val, runner, test)
        model = stages.place(ctx, stages.Model(apply_fn, params, graphdef))
        model, record = stages.pretrain(ctx, model, stages.Record())
        if cfg.head_threshold or cfg.head_ratio or cfg.reuse or cfg.reuse_budget:
            model = model._replace(params=distributed.to_local(model.params))  # surgery on a whole copy
        for structural in (model_stages.prune_heads, model_stages.reuse_layers):
            changed, record = structural(ctx, model, record)
            if changed is not model:
                plan, model = build_plan(cfg, changed.params), stages.place(ctx, changed)
        pretrained_params = model.params
        mixtures, model, record = stages.retrain(ctx, plan, model, record)
        retrained, start = model.params, time.perf_counter()
        codebooks, model, record = stages.compress(ctx, plan, mixtures, model, record)
        model, record = model_stages.quantise_activations(ctx, model, record)
        codebooks, model, record = stages.finetune(ctx, codebooks, model, record, cfg.finetune_epochs, start)
        # the Han count where the shards live; then the file writer's copy (several processes: gathered)
        summary = accounting.summarize(
            codebooks, model.params, removed=model.removed, float_codes=model.float_codes,
            state=modes.state_of(model.apply_fn),  # BatchNorm statistics count as float values
        )  # fmt: skip
        codebooks, final = _on_host(codebooks, model.params)
        figures = _figure_weights(plan, pretrained_params, retrained)
        if not writer:
            return None
        sample = ds.x_test[:64] if export_onnx else None
        metrics = _save_results(
            ctx, workdir, codebooks, model._replace(params=final), record, sample, summary
        )
        _figures(workdir, plan, mixtures, *figures)
    return metrics


def _on_host(codebooks, final):
    """Codebooks and params as host arrays (several processes: the indices and the float leaves
    gathered, the quantised leaves rebuilt from them rather than gathered as floats)."""
    if not distributed.multi_process():
        return codebooks, final
    codebooks = distributed.to_local(codebooks)
    floats = distributed.to_local({p: v for p, v in flatten(final).items() if p not in codebooks})
    return codebooks, codebook.dequantize(codebooks, replace_leaves(final, floats))


def _save_results(ctx, workdir, codebooks, model, record, onnx_sample, summary) -> dict:
    """model.gqz, model.onnx (when ``onnx_sample`` is given) and metrics.json."""
    cfg, final = ctx.cfg, model.params
    flat = {p: np.asarray(v) for p, v in flatten(final).items()}
    model_path = workdir / "model.gqz"
    file_bytes = save_model_file(model_path, cfg, codebooks, model)
    extra = {
        "model": cfg.model,
        "dataset": cfg.dataset,
        "task": cfg.task,
        "seconds": record.times,
        "file_bytes": file_bytes,
        "gzip_ratio": accounting.gzip_ratio(flat),
        "validation": {"fraction": cfg.val_fraction, "seed": cfg.seed, "examples": len(ctx.val[1])},
        **{f"val_{report.metric_name(cfg.task)}_{k}": v for k, v in record.val_errors.items()},
        **{f"perplexity_{k}": v for k, v in record.perplexities.items()},
        **{f"val_perplexity_{k}": v for k, v in record.val_perplexities.items()},
    }
    if model.heads:
        extra["heads"] = model.heads
    extra["units"] = unit_table(codebooks)
    if model.disconnected:
        extra["disconnected"] = model.disconnected
    extra["retrain_epochs"] = record.retrain_epochs
    if cfg.snap_epochs:  # the "retrained" errors are then of weights the network was not trained to use
        extra["snap_epochs"] = cfg.snap_epochs
    if model.links:
        extra["reuse"] = [dataclasses.asdict(link) for link in model.links]
    if model.reuse_table:
        extra["reuse_choice"] = model.reuse_table
    if onnx_sample is not None:
        extra["onnx"] = _export(model_path, workdir, onnx_sample, onnx_encoding(cfg), cfg.model)
    metrics = report.metrics_dict(record.errors, summary, extra, metric=report.metric_name(cfg.task))
    report.write_metrics(workdir, metrics)
    return metrics


def unit_table(codebooks: dict) -> dict:
    """{path: {"outputs": [live, of], "inputs": [live, of]}} of every codebook of 2 or more
    dimensions: the units with a non-zero weight (``core.unit_prior.live_units``)."""
    out = {}
    for path, cb in codebooks.items():
        indices = np.asarray(cb.indices)
        live = unit_prior.live_units(indices)  # an index is 0 exactly where the weight is 0
        if live:
            out[path] = {"outputs": [live[0], indices.shape[-1]], "inputs": [live[1], indices.shape[-2]]}
    return out


def save_model_file(path, cfg: cfgm.Config, codebooks, model) -> int:
    """Write ``model`` (a ``stages.Model``) as a run ships it, to ``path`` (its ``model.gqz``): its
    name, the config fields that differ from the defaults, the activation scales, reuse links, float
    codes and state; returns the file's bytes (what a size target judges)."""
    storage.save_compressed(
        path,
        codebooks,
        model.params,
        model=cfg.model,
        config=cfgm.changed_fields(cfg),
        activations=model.activations,
        reuse=list(model.links),
        float_codes=model.float_codes,
        state=modes.state_of(model.apply_fn),
    )
    return path.stat().st_size


def onnx_encoding(cfg: cfgm.Config) -> str | None:
    """The weight encoding of a run's ``model.onnx``: ``grid`` when the config puts the weights on a
    grid (``grid_bits`` or an activation mode: what integer kernels take), else None (the exporter's
    default)."""
    return "grid" if cfg.weight_bits else None


def _export(model_path, workdir, sample, encoding, model):
    try:
        from gmm_quant.formats import export
    except ImportError as err:  # onnx is an optional extra
        return {"skipped": f"onnx not installed ({err})"}
    out = workdir / "model.onnx"
    # the model this run was given (a factory the user named is trusted, as it was for training)
    info = export.export_file(
        model_path, out, sample=sample, encoding=encoding or export.ENCODING, model=model
    )
    return {"path": str(out), **info}


def _figure_weights(plan, before, after):
    """The first mixture's weights before and after retraining (several processes: a sample of each
    layer taken where it lives, at most ``distributed.SAMPLE`` values)."""
    paths = plan.group_paths(next(iter(plan.mixtures)))
    fb, fa = flatten(before), flatten(after)
    w0 = np.concatenate([distributed.sample(fb[p]) for p in paths])
    w1 = np.concatenate([distributed.sample(fa[p]) for p in paths])
    return w0, w1


def _figures(workdir, plan, mixtures, w0, w1):
    group = next(iter(plan.mixtures))
    cfg, state = plan.mixtures[group], distributed.to_local(mixtures[group])
    comps = codebook.assign(cfg, state, w1)
    report.plot_figures(workdir, cfg, state, w0, w1, comps)
