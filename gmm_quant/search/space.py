"""The search space: which settings a trial may change, as overrides of a base ``Config``.

Every dimension is named; a trial's suggestions become Config fields, so the best trial is written
as a config file that ``python -m gmm_quant.train --config-file`` reproduces. Multiplicative
dimensions (``tau``, ``hyperprior``, ``retrain_epochs``) scale the base config's value, so one space
serves models whose good tau differs by orders of magnitude.

With a deploy target (a file size or a latency) the deployment choices join the default dimensions,
those the model supports (``deploy_dimensions``): the unit prior (units it zeroes leave the exported
graph), the float leaves' bits, the activation mode (integer kernels, which need the ``grid`` encoding:
the run exports it so) and the share of attention heads removed. Each trial exports its model and
measures the real file and latency (``targets``). The weight encoding is not a dimension: the exporter
already keeps, per layer, the smallest of the sparse and dense codebook forms (ONNX Runtime decodes both
at load, so they run the same kernels).
"""

from __future__ import annotations

import dataclasses
import math
import re

from gmm_quant.run.config import Config, unit_strengths

DIMENSIONS = (
    "tau",  # prior strength: base tau x [1/5, 5], log-uniform
    "hyperprior",  # Gamma hyper-prior strength: both (alpha, beta) pairs x [1/10, 10], log-uniform
    "precision",  # the hyper-priors' mean precision x [1/3, 3] (their betas divided), log-uniform
    "num_components",  # 9, 17 or 33 components
    "prune_threshold",  # one threshold for all layers, fraction of a layer in [1e-5, 1e-2], log
    "layer_prune",  # a threshold per quantised layer instead (same range)
    "own_mixture",  # per quantised layer: share the mixture or get one of its own
    "keep_float",  # per sensitive small layer (see ``sensitive_layers``): quantise or keep float32
    "distill",  # distillation from the pretrained model (alpha 0.5) on or off
    "retrain_epochs",  # base retraining length x 0.5, 1 or 2
    "quantise_biases",  # biases keep float32 or get codebooks of their own
    "units",  # unit prior (structured sparsity): off, or on at [0.1, 3] (log); or the base's x [0.1, 10]
    "float_bits",  # deployment: leaves outside the prior float32 or 4/6/8-bit codes
    "activation_mode",  # deployment: float activations, W8A8 or W4A8 (Linear layers, no model state)
    "heads",  # deployment: remove 0, 1/4 or 1/2 of each attention layer's heads (lowest weight norms)
)
DEPLOY_DIMENSIONS = ("units", "float_bits", "activation_mode", "heads")
FLOAT_BITS = (0, 4, 6, 8)
ACTIVATION_MODES = ("", "w8a8", "w4a8")
HEAD_RATIOS = (0.0, 0.25, 0.5)
DEFAULT_DIMENSIONS = (
    "tau", "hyperprior", "precision", "own_mixture", "layer_prune", "distill", "quantise_biases",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Space:
    """The dimensions a search varies (a subset of ``DIMENSIONS``); others keep the base value.

    Invariants: every name is in ``DIMENSIONS``; ``prune_threshold`` and ``layer_prune`` exclude each
    other (one sets every layer's threshold, the other each layer's).
    """

    dimensions: tuple[str, ...] = DEFAULT_DIMENSIONS

    def __post_init__(self):
        unknown = [d for d in self.dimensions if d not in DIMENSIONS]
        if unknown:
            raise ValueError(f"unknown search dimension {unknown[0]!r}; choose from {list(DIMENSIONS)}")
        if {"prune_threshold", "layer_prune"} <= set(self.dimensions):
            raise ValueError("search dimensions prune_threshold and layer_prune exclude each other")

    def __contains__(self, name: str) -> bool:
        return name in self.dimensions


def sensitive_layers(sensitivity: dict, budget: float, sizes: dict, share: float = 0.1) -> list:
    """Layers worth offering ``keep_float``: snapping one alone to 3 centres of its own k-means costs
    more than ``budget`` (a fraction) on the validation split, and it holds under ``share`` of the
    quantised weights. ``sensitivity`` is ``sensitivity.layer_sensitivity``'s result with k=3."""
    total = sum(sizes.values())
    rows = sensitivity["layers"].items()
    return [
        p for p, row in rows if row["k=3"] - sensitivity["baseline"] > budget and sizes[p] < share * total
    ]


def suggest(trial, space: Space, base: Config, layers: list[str], sensitive: list[str], hidden=None) -> dict:
    """Config overrides for this trial (Optuna's define-by-run API); ``hidden``: the layers the
    ``units`` dimension acts on (None: every quantised leaf)."""
    out = {}
    if "tau" in space:
        out["tau"] = base.tau * trial.suggest_float("tau_x", 0.2, 5.0, log=True)
    s = trial.suggest_float("hyperprior_x", 0.1, 10.0, log=True) if "hyperprior" in space else 1.0
    m = trial.suggest_float("precision_x", 1 / 3, 3.0, log=True) if "precision" in space else 1.0
    if {"hyperprior", "precision"} & set(space.dimensions):
        out["zero_gamma"] = (base.zero_gamma[0] * s, base.zero_gamma[1] * s / m)
        out["gamma"] = (base.gamma[0] * s, base.gamma[1] * s / m)
    if "num_components" in space:
        out["num_components"] = trial.suggest_categorical("num_components", [9, 17, 33])
    if "prune_threshold" in space:
        out["prune_threshold"] = trial.suggest_float("prune_threshold", 1e-5, 1e-2, log=True)
    if "layer_prune" in space:
        out["layer_prune"] = tuple(
            f"^{re.escape(p)}$={trial.suggest_float(f'prune/{p}', 1e-5, 1e-2, log=True):.6g}" for p in layers
        )
    if "own_mixture" in space:
        own = [p for p in layers if trial.suggest_categorical(f"own/{p}", [False, True])]
        out["own_mixture"] = tuple(f"^{re.escape(p)}$" for p in own)
    if "keep_float" in space and sensitive:
        kept = [p for p in sensitive if trial.suggest_categorical(f"float/{p}", [False, True])]
        out["keep_float"] = base.keep_float + tuple(f"^{re.escape(p)}$" for p in kept)
    if "distill" in space and base.task != "regress":  # distillation is for classifiers
        out["distill_alpha"] = 0.5 if trial.suggest_categorical("distill", [False, True]) else 0.0
    if "retrain_epochs" in space:
        scale = trial.suggest_categorical("retrain_x", [0.5, 1.0, 2.0])
        out["retrain_epochs"] = max(1, math.ceil(base.retrain_epochs * scale))
    if "quantise_biases" in space:
        out["quantise_biases"] = trial.suggest_categorical("quantise_biases", [False, True])
    if "units" in space:
        out["unit_prior"] = _unit_prior(trial, base, hidden)
    if "float_bits" in space:
        out["float_bits"] = trial.suggest_categorical("float_bits", _with(FLOAT_BITS, base.float_bits))
    if "activation_mode" in space:
        modes = _with(ACTIVATION_MODES, base.activation_mode)
        out["activation_mode"] = trial.suggest_categorical("activation_mode", modes)
    if "heads" in space:
        out["head_ratio"] = trial.suggest_categorical("head_ratio", _with(HEAD_RATIOS, base.head_ratio))
    return out


def _unit_prior(trial, base: Config, hidden) -> tuple[str, ...]:
    """The base config's unit prior items with their strengths scaled (x [1/10, 10], log); without
    any, off or on over the ``hidden`` layers (None: every leaf) at a strength in [0.1, 3] (log)."""
    if base.unit_prior:
        scale = trial.suggest_float("unit_x", 0.1, 10.0, log=True)
        return tuple(f"{pattern}={strength * scale:.6g}" for pattern, strength in unit_strengths(base))
    if not trial.suggest_categorical("units", [False, True]) or hidden == []:
        return ()
    pattern = ".*" if hidden is None else "^(?:" + "|".join(map(re.escape, hidden)) + ")$"
    return (f"{pattern}={trial.suggest_float('unit_strength', 0.1, 3.0, log=True):.6g}",)


def _with(choices: tuple, base_value) -> list:
    """The choices, the base config's value among them (so the base point is one of them)."""
    return list(choices) if base_value in choices else [*choices, base_value]


def deploy_dimensions(supports_activations: bool, has_heads: bool) -> tuple[str, ...]:
    """The deployment dimensions a model supports: the unit prior (whole units removed from the file)
    and float bits always; the activation mode with Linear layers and no model state (BatchNorm
    statistics); heads with attention layers."""
    out = ["units", "float_bits"]
    if supports_activations:
        out.append("activation_mode")
    if has_heads:
        out.append("heads")
    return tuple(out)


def base_point(space: Space, layers: list[str], sensitive: list[str], base: Config | None = None) -> dict:
    """Optuna parameters that reproduce the base config (enqueued as a new study's first trial)."""
    base = base or Config()
    point = {"tau_x": 1.0, "hyperprior_x": 1.0, "precision_x": 1.0, "distill": False, "retrain_x": 1.0}
    point.update(float_bits=base.float_bits, activation_mode=base.activation_mode, head_ratio=base.head_ratio)
    point["quantise_biases"] = False
    point.update({"unit_x": 1.0} if base.unit_prior else {"units": False})
    point.update({f"own/{p}": False for p in layers})
    point.update({f"float/{p}": False for p in sensitive})
    point.update({f"prune/{p}": 1e-5 for p in layers})
    point.update({"prune_threshold": 1e-5, "num_components": 17})
    return point
