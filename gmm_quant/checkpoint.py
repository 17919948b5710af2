"""Checkpoints of the command line's stages in the work directory (orbax; atomic writes).

Layout::

    WORKDIR/config.json               the config the checkpoints belong to (refused if it differs)
    WORKDIR/checkpoints/<stage>/<N>   orbax checkpoint after epoch N of the stage (N = epochs: done)

A checkpoint holds the stage's whole ``TrainState`` (params, mixture, optimiser state, step). Batch
order is a function of (seed, epoch), so the RNG state is the epoch number itself; a run killed at any
moment and started again resumes after the last completed epoch and ends with the same numbers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import jax
import orbax.checkpoint as ocp

from gmm_quant.config import Config


class CheckpointMismatch(RuntimeError):
    """The work directory holds checkpoints of a different config."""


def write_atomic(path: pathlib.Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and rename: never a half-written file."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def claim_workdir(workdir: pathlib.Path, cfg: Config) -> None:
    """Record ``cfg`` in ``workdir``; refuse a workdir whose checkpoints came from another config."""
    workdir = pathlib.Path(workdir)
    path = workdir / "config.json"
    current = dataclasses.asdict(cfg)
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("fingerprint") != cfg.fingerprint():
            diff = {
                k: (saved.get("config", {}).get(k), v)
                for k, v in current.items()
                if saved.get("config", {}).get(k) != (list(v) if isinstance(v, tuple) else v)
            }
            raise CheckpointMismatch(
                f"{workdir} holds checkpoints of a different config (saved vs now: {diff}); "
                "use another --workdir, or --overwrite to start afresh"
            )
        return
    text = json.dumps({"fingerprint": cfg.fingerprint(), "config": current}, indent=1)
    write_atomic(path, text.encode())


class StageCheckpoints:
    """Per-epoch checkpoints of one stage (keeps the latest two)."""

    def __init__(self, workdir, stage: str):
        directory = (pathlib.Path(workdir) / "checkpoints" / stage).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
        self.manager = ocp.CheckpointManager(directory, options=options)

    def latest_epoch(self) -> int | None:
        return self.manager.latest_step()

    def save(self, epoch: int, state) -> None:
        self.manager.save(epoch, args=ocp.args.StandardSave(state))
        self.manager.wait_until_finished()

    def restore(self, epoch: int, like):
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        return self.manager.restore(epoch, args=ocp.args.StandardRestore(abstract))

    def close(self) -> None:
        self.manager.close()
