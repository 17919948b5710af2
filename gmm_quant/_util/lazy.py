"""Re-exports resolved on first use (PEP 562), so that importing a package loads none of the modules
it re-exports until a name is asked for."""

from __future__ import annotations

import importlib


def exports(namespace: dict, table: dict[str, str | tuple[str, str]]):
    """``(__getattr__, __dir__)`` for the package whose globals are ``namespace``.

    ``table`` maps a public name to the module defining it, or to ``(module, name there)`` when the
    package names it differently, or to ``(module, None)`` for the module itself (a sub-package). A
    resolved name is cached in ``namespace``.
    """

    def __getattr__(name: str):
        if name not in table:
            raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")
        module, attr = (table[name], name) if isinstance(table[name], str) else table[name]
        value = importlib.import_module(module)
        if attr is not None:
            value = getattr(value, attr)
        namespace[name] = value
        return value

    def __dir__():
        return sorted(set(namespace) | set(table))

    return __getattr__, __dir__
