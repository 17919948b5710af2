"""Which parameter leaves get the prior and are quantised: regex rules on the parameter path.

A path is the leaf's keys joined by ``/`` (``"fc1/kernel"``; Flax NNX's trailing ``value`` attribute is
dropped). Rules are tried in order and the first whose ``pattern`` matches (``re.search``) wins. The
default rules keep biases and normalisation scales in float32 and put every other leaf under one shared
mixture. Rules that match no leaf (other than the defaults) are reported (a warning, and
``Plan.unused``) because they are almost always a typo.
"""

from __future__ import annotations

import dataclasses
import re
import warnings

import jax

from gmm_quant.core.mixture import MixtureConfig


@dataclasses.dataclass(frozen=True)
class Rule:
    """Settings for the leaves whose path matches ``pattern``.

    Attributes:
      pattern: regular expression searched in the leaf's path.
      keep_float: leave these leaves in float32: no prior, no quantisation (they may keep training).
      mixture: a mixture of their own with this config; None shares the plan's default mixture.
      per_layer: every matching leaf gets a mixture of its own (``mixture``, or the plan's default
        config), so layers whose weights live at different scales do not share centres.
      prune_threshold: components with at most this many members in the layer are pruned;
        values below 1 are a fraction of the layer's size, values of 1 or more an absolute count.
      merge_kl: merge components whose symmetric KL divergence is below this (None: no merging).
      per_slice: a stacked leaf (blocks on axis 0, as ``nnx.vmap`` builds them) gets one codebook per
        slice: every block's own surviving centres, pruned and fine-tuned on its own, as if the blocks
        were separate layers; the Han count and the file pay one codebook per slice. False: one
        codebook for the whole stack.
      unit_prior: strength of the unit prior (``core.unit_prior``) on these leaves' input and output
        units, added to the complexity (so scaled by tau / N); 0: none. Leaves of fewer than 2
        dimensions take none.
    """

    pattern: str
    keep_float: bool = False
    mixture: MixtureConfig | None = None
    prune_threshold: float = 0.0
    merge_kl: float | None = None
    per_layer: bool = False
    per_slice: bool = False
    unit_prior: float = 0.0

    def __post_init__(self):
        try:
            re.compile(self.pattern)
        except re.error as err:
            raise ValueError(f"Rule pattern {self.pattern!r} is not a valid regex: {err}") from None
        if self.prune_threshold < 0:
            raise ValueError(f"prune_threshold must be >= 0, got {self.prune_threshold}")
        if self.merge_kl is not None and self.merge_kl < 0:
            raise ValueError(f"merge_kl must be >= 0 or None, got {self.merge_kl}")
        if not 0 <= self.unit_prior < float("inf"):
            raise ValueError(f"unit_prior must be a finite number >= 0, got {self.unit_prior}")

    def threshold_count(self, size: int) -> float:
        """The member count at or below which a component is pruned in a layer of ``size`` weights."""
        t = self.prune_threshold
        return t * size if t < 1 else t


DEFAULT_RULES = (
    Rule(r"(^|/)(bias|scale)$", keep_float=True),
    Rule(r".*"),
)
SHARED = "shared"


def path_str(path) -> str:
    """'a/b/kernel' from a jax key path (drops Flax NNX's trailing ``.value``)."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    if len(parts) > 1 and parts[-1] == "value":
        parts.pop()
    return "/".join(parts)


def flatten(params) -> dict:
    """Ordered {path: leaf} of a parameter pytree."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    out = {path_str(p): leaf for p, leaf in flat}
    if len(out) != len(flat):
        raise ValueError("two parameter leaves format to the same path; rename them")
    return out


def replace_leaves(params, new: dict):
    """``params`` with the leaves named in ``new`` ({path: array}) replaced."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    leaves = [new.get(path_str(p), leaf) for p, leaf in flat]
    return jax.tree_util.tree_unflatten(treedef, leaves)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Rules resolved against one parameter pytree.

    Attributes:
      rules: {path: Rule} for every leaf, in pytree order.
      mixtures: {group: MixtureConfig}; group ``"shared"`` or the pattern of a rule with its own mixture.
      unused: patterns of the rules that matched no leaf.
    """

    rules: dict
    mixtures: dict
    unused: tuple

    def quantised(self) -> list[str]:
        """Paths of the leaves under a prior (and quantised at compression)."""
        return [p for p, r in self.rules.items() if not r.keep_float]

    def group_of(self, path: str) -> str:
        rule = self.rules[path]
        if rule.per_layer:
            return path
        return SHARED if rule.mixture is None else rule.pattern

    def group_paths(self, group: str) -> list[str]:
        return [p for p in self.quantised() if self.group_of(p) == group]

    def group_weights(self, params, group: str) -> list:
        flat = flatten(params)
        return [flat[p] for p in self.group_paths(group)]


def make_plan(params, rules=DEFAULT_RULES, mixture: MixtureConfig | None = None) -> Plan:
    """Resolve ``rules`` (first match wins) on ``params``; ``mixture`` configures the shared group."""
    mixture = mixture or MixtureConfig()
    resolved, used = {}, set()
    for path in flatten(params):
        rule = next((r for r in rules if re.search(r.pattern, path)), None)
        if rule is None:
            raise ValueError(f"no rule matches parameter {path!r}; end the rules with Rule('.*')")
        resolved[path] = rule
        used.add(rule.pattern)
    unused = tuple(r.pattern for r in rules if r.pattern not in used and r not in DEFAULT_RULES)
    if unused:
        warnings.warn(f"rules matched no parameter: {list(unused)}", stacklevel=2)
    groups = {}
    for path, rule in resolved.items():
        if not rule.keep_float:
            group = path if rule.per_layer else SHARED if rule.mixture is None else rule.pattern
            groups.setdefault(group, rule.mixture or mixture)
    if not groups:
        raise ValueError("the rules put no parameter under the prior (every leaf is keep_float)")
    return Plan(resolved, groups, unused)


def is_random_key(value) -> bool:
    """Whether a leaf is a typed random-number key (``jax.random.key``): model state that is not a
    value to store or count (``nnx.Rngs`` of a Dropout model)."""
    import jax

    return hasattr(value, "dtype") and jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key)
