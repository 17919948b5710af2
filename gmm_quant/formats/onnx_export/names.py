"""Short tensor names in the file shipped: the converter names every tensor after the layer and the
step that made it (``blocks_0_attn_key_kernel_idx32``), readable while building and testing, but in a
small model those strings are a large part of the file (a 4-block ViT: 14.7 KB of names and node
identifiers in a 104 KB file). ``compact_names`` renames every tensor other than the graph's inputs
and outputs to a base-36 counter and clears the optional node names; the computation is unchanged.
"""

from __future__ import annotations

import string

_DIGITS = string.digits + string.ascii_lowercase


def _base36(n: int) -> str:
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = _DIGITS[r] + out
        if n == 0:
            return out


def _has_subgraphs(graph) -> bool:
    return any(attr.g.node or attr.graphs for node in graph.node for attr in node.attribute)


def compact_names(model) -> bool:
    """Rename ``model``'s tensors in place; returns False (and leaves it alone) for a graph with
    subgraphs (``Loop``/``If`` bodies see their parent's names)."""
    graph = model.graph
    if _has_subgraphs(graph):
        return False
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        if name not in names:
            candidate = _base36(len(names))
            while candidate in keep:  # never a graph input's or output's name
                names[f"\0{candidate}"] = candidate
                candidate = _base36(len(names))
            names[name] = candidate
        return names[name]

    for init in graph.initializer:
        init.name = short(init.name)
    for node in graph.node:
        node.name = ""
        node.input[:] = [short(n) for n in node.input]
        node.output[:] = [short(n) for n in node.output]
    for info in graph.value_info:
        info.name = short(info.name)
    return True
