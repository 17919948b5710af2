"""The named configs: one module per experiment with ``get_config() -> Config`` and a docstring
stating its command, runtime and expected result; or a file of one's own with ``get_config()``, as the
Flax examples write them (``--config path/to/my_config.py``)."""

from __future__ import annotations

import importlib
import importlib.util
import pathlib
import pkgutil

from gmm_quant.run.config import Config, ConfigError


def available() -> list[str]:
    """The names of the configs (``--config NAME``)."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__))


def load(name: str) -> Config:
    """The config of experiment ``name`` (a module of this package), or of a ``.py`` file's
    ``get_config()``."""
    if name.endswith(".py"):
        return load_python_file(pathlib.Path(name))
    if name not in available():
        raise ConfigError(f"unknown config {name!r}; choose one of {available()} or a .py file")
    return importlib.import_module(f"{__name__}.{name}").get_config()


def load_python_file(path: pathlib.Path) -> Config:
    """``get_config()`` of the Python file ``path``; its result must be a ``Config``."""
    if not path.is_file():
        raise ConfigError(f"config file {path}: no such file")
    spec = importlib.util.spec_from_file_location(f"_gmm_quant_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        raise ConfigError(f"config file {path}: it fails to run ({type(err).__name__}: {err})") from None
    if not callable(getattr(module, "get_config", None)):
        raise ConfigError(f"config file {path}: it defines no get_config()")
    cfg = module.get_config()
    if not isinstance(cfg, Config):
        raise ConfigError(
            f"config file {path}: get_config() returned {type(cfg).__name__}, not gmm_quant.Config"
        )
    return cfg
