"""The named configs: one module per experiment with ``get_config() -> Config`` and a docstring
stating its command, runtime and expected result."""

from __future__ import annotations

import importlib
import pkgutil

from gmm_quant.run.config import Config, ConfigError


def available() -> list[str]:
    """The names of the configs (``--config NAME``)."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__))


def load(name: str) -> Config:
    """The config of experiment ``name`` (a module of this package)."""
    if name not in available():
        raise ConfigError(f"unknown config {name!r}; choose one of {available()}")
    return importlib.import_module(f"{__name__}.{name}").get_config()
