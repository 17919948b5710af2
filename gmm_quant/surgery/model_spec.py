"""Rebuild a model from the name a ``.gqz`` file records: a project model or ``package.module:factory``.

``make_model("lenet5_caffe")`` looks the name up in the project's ``models`` registry;
``make_model("mypkg.nets:make_net")`` imports ``mypkg.nets`` and calls ``make_net()`` (or, if it takes
them, ``make_net(rngs=nnx.Rngs(seed))``), which must return a Flax NNX module. Pass the same string as
``model=`` to ``save_compressed`` so that the file can be loaded and exported without a template.
"""

from __future__ import annotations

import importlib
import inspect

from flax import nnx


class ModelSpecError(ValueError):
    """A model name that names nothing importable, or a factory that does not return an NNX module."""


def make_model(spec: str, seed: int = 0) -> nnx.Module:
    if ":" not in spec:
        import models

        if spec not in models.MODELS:
            raise ModelSpecError(
                f"unknown model {spec!r}: not one of {sorted(models.MODELS)} and not 'package.module:factory'"
            )
        return models.create(spec, seed)
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ModelSpecError(f"model {spec!r}: cannot import it ({err})") from None
    takes_rngs = "rngs" in inspect.signature(factory).parameters
    model = factory(rngs=nnx.Rngs(seed)) if takes_rngs else factory()
    if not isinstance(model, nnx.Module):
        raise ModelSpecError(f"model {spec!r} returned {type(model).__name__}, not a flax.nnx.Module")
    return model
