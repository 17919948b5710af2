"""Weights from the user's own training: an Orbax checkpoint, a Flax msgpack file, a ``.safetensors`` file.

``read_weights(path)`` gives ``{path: array}``; ``match_weights(found, params, state)`` puts them into the
model's parameters and state by path, refusing in one line (``WeightsMismatch``) any path the model
has and the file lacks, any the file has and the model lacks, and any shape that differs.

Paths are matched after one renaming rule, applied to both sides: separators ``.`` and ``:`` become
``/`` (``blocks.0.mlp.kernel`` is ``blocks/0/mlp/kernel``); a leading Linen collection name is dropped
(``params/``, and ``batch_stats/`` etc. for the state: a Linen ``variables`` dict); a trailing
``/value`` (an ``nnx.State`` saved with its variables' attributes) is dropped. Random-number streams
(keys and counts) are the model's own and never read.
"""

from __future__ import annotations

import pathlib

import numpy as np

from gmm_quant.core.rules import flatten, is_random_key, replace_leaves

COLLECTIONS = ("params", "batch_stats", "cache", "intermediates")
KINDS = ".safetensors, .msgpack (flax.serialization) or an Orbax checkpoint directory"


class WeightsMismatch(ValueError):
    """A weights file whose paths or shapes do not fit the model."""


def canonical(path: str) -> str:
    """The renaming rule of the module docstring."""
    parts = [p for p in path.replace(".", "/").replace(":", "/").split("/") if p]
    if len(parts) > 1 and parts[0] in COLLECTIONS:
        parts = parts[1:]
    if len(parts) > 1 and parts[-1] == "value":
        parts = parts[:-1]
    return "/".join(parts)


def read_weights(path) -> dict:
    """``{path: numpy array}`` of a weights file (see ``KINDS``); a file that does not parse is
    refused naming it (``ValueError``)."""
    path = pathlib.Path(path)
    try:
        return _read(path)
    except (OSError, ValueError, TypeError, KeyError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"pretrained {path}: not a readable weights file ({first})") from None
    except Exception as err:  # safetensors' own error types, msgpack's, orbax's
        if type(err).__module__.split(".")[0] not in ("safetensors", "msgpack", "orbax", "tensorstore"):
            raise
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"pretrained {path}: not a readable weights file ({first})") from None


def _read(path: pathlib.Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return dict(load_file(str(path)))
    if path.suffix == ".msgpack":
        from flax import serialization

        tree = serialization.msgpack_restore(path.read_bytes())
        return {p: np.asarray(v) for p, v in _flat_dict(tree).items()}
    if path.is_dir():
        import orbax.checkpoint as ocp

        with ocp.StandardCheckpointer() as checkpointer:
            tree = checkpointer.restore(path.resolve())
        return {p: np.asarray(v) for p, v in _flat_dict(tree).items()}
    raise ValueError(f"pretrained {path}: not a weights file ({KINDS})")


def _flat_dict(tree, prefix="") -> dict:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flat_dict(value, f"{prefix}/{key}" if prefix else str(key)))
        return out
    return {prefix: tree}


def match_weights(found: dict, params, state=None):
    """``(params, state)`` with every leaf taken from ``found`` by canonical path; state leaves that
    ``found`` lacks keep the model's own values only when ``found`` holds no state at all (a file of
    parameters alone: the statistics start fresh, as the model's initialiser made them)."""
    files = {}
    for name, value in found.items():
        files.setdefault(canonical(name), (name, value))
    wanted = {canonical(p): (p, v) for p, v in flatten(params).items()}
    state_wanted = {canonical(p): (p, v) for p, v in flatten(state or {}).items() if not is_random_key(v)}
    state_wanted = {k: v for k, v in state_wanted.items() if not k.endswith(("rngs/count", "rngs/key"))}
    has_state = any(k in files for k in state_wanted)
    needed = {**wanted, **(state_wanted if has_state else {})}
    missing = sorted(set(needed) - set(files))
    unexpected = sorted(set(files) - set(wanted) - set(state_wanted))
    shapes = [
        f"{k} (file {tuple(np.shape(files[k][1]))}, model {tuple(np.shape(v))})"
        for k, (_, v) in needed.items()
        if k in files and tuple(np.shape(files[k][1])) != tuple(np.shape(v))
    ]
    if missing or unexpected or shapes:
        raise WeightsMismatch(
            "the weights do not fit the model: "
            + "; ".join(
                f"{what} {_few(items)}"
                for what, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes))
                if items
            )
        )
    new_params = replace_leaves(params, {p: _cast(files[k][1], v) for k, (p, v) in wanted.items()})
    if not has_state:
        return new_params, state
    new_state = replace_leaves(state, {p: _cast(files[k][1], v) for k, (p, v) in state_wanted.items()})
    return new_params, new_state


def _cast(value, like):
    return np.asarray(value).astype(np.asarray(like).dtype, copy=False)


def _few(items, n=5) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")
