"""The maths: the mixture prior and its objective, per-layer rules, codebooks (assign, prune, snap),
grids and float codes, the Han count, codebook tuning, and compression of sharded layers where they
live. Imports only jax, numpy, scipy, optax and ``gmm_quant._util``.

The names below are pure functions over pytrees (and their small NamedTuple states); each module is
also reachable as ``gmm_quant.core.<module>``.
"""

from gmm_quant._util.lazy import exports

_MODULES = (
    "accounting", "codebook", "codebook_tuning", "fake_quant", "float_codes", "grid", "han", "init",
    "mixture", "objective", "rules", "sharded",
)  # fmt: skip
_NAMES = {
    "MixtureConfig": "mixture", "MixtureState": "mixture", "complexity": "mixture",
    "init_mixture": "mixture", "log_density": "mixture", "log_prob": "mixture",
    "responsibilities": "mixture",
    "LearningRates": "objective", "init_mixtures": "objective", "joint_loss": "objective",
    "joint_optimizer": "objective", "tau_schedule": "objective",
    "DEFAULT_RULES": "rules", "Plan": "rules", "Rule": "rules", "make_plan": "rules",
    "flatten": "rules", "replace_leaves": "rules",
    "Codebook": "codebook", "compress": "codebook", "dequantize": "codebook",
    "make_codebook": "codebook", "snap": "codebook", "kmeans_1d": "codebook",
    "sample_params": "init", "summarize": "accounting", "code_float_leaves": "float_codes",
}  # fmt: skip

__getattr__, __dir__ = exports(
    globals(),
    {**{n: f"gmm_quant.core.{m}" for n, m in _NAMES.items()},
     **{m: (f"gmm_quant.core.{m}", None) for m in _MODULES}},
)  # fmt: skip
__all__ = sorted(_NAMES)
