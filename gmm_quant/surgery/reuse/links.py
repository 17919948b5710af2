"""Which layer reuses which: ``Link`` and the config's reuse rules.

A rule ``"TARGET_REGEX=SOURCE"`` links every module whose path matches the regex (for instance
``blocks/[23]/mlp_in$``) to the module at path ``SOURCE`` (``blocks/1/mlp_in``; ``\\1`` and the like
stand for the target's groups, as in ``re.sub``); the first rule that
matches a module wins, and rules that match no module are reported. A module that is a source is
never a target, and no module reuses itself.
"""

from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class Link:
    """``target`` (a module path, e.g. ``blocks/3/mlp_in``) computes ``source``'s output transformed;
    ``rank`` > 0 adds a low-rank correction of that rank."""

    target: str
    source: str
    rank: int = 0


def parse_rule(item: str) -> tuple[str, str]:
    """``"TARGET_REGEX=SOURCE"`` -> (regex, source path); ValueError naming the item if malformed."""
    pattern, sep, source = item.rpartition("=")
    if not sep or not pattern or not source:
        raise ValueError(f"reuse rule {item!r}: expected TARGET_REGEX=SOURCE_PATH")
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"reuse rule {item!r}: {pattern!r} is not a regular expression ({err})") from None
    return pattern, source


def links_from_rules(rules, module_paths, rank: int = 0) -> tuple[list[Link], list[str]]:
    """(links, unused rules) of ``rules`` on the model's ``module_paths``, first match wins; the
    source may refer to the target's groups (``blocks/[23]/(mlp_in|mlp_out)$=blocks/1/\\1``)."""
    parsed = [(item, *parse_rule(item)) for item in rules]
    found, used = {}, set()
    for path in module_paths:
        for item, pattern, source in parsed:
            match = re.search(pattern, path)
            if match and match.expand(source) != path:
                found[path] = Link(path, match.expand(source), rank)
                used.add(item)
                break
    sources = {link.source for link in found.values()}
    links = [link for path, link in found.items() if path not in sources]
    return links, [item for item, _, _ in parsed if item not in used]
