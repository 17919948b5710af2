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


class UntrustedModel(ModelSpecError):
    """A file asks for a factory to be imported and called, and the caller has not said it trusts it."""


def check_trusted(spec: str | None, trust: bool) -> None:
    """Refuse, before anything is imported, a ``package.module:factory`` that only a file names.

    The project's own model names are looked up in its registry and always allowed; a factory runs
    arbitrary code (its module's import, then the call), so it is allowed only when the caller says it
    trusts the file (``trust``), as Keras' ``safe_mode`` and PyTorch's ``weights_only`` do.
    """
    if spec is None or ":" not in spec or trust:
        return
    raise UntrustedModel(
        f"the file names its model {spec!r}, which would import and run that code; if you trust the file, "
        f"pass trust_model=True (--trust-model), or pass the model yourself (model=...)"
    )


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
