"""gmm_quant: compress neural networks by Bayesian soft weight-sharing (Ullrich et al., 2017).

A Gaussian mixture prior over the weights is trained jointly with them; then each layer's weights are
assigned to mixture components, sparse components pruned, and the weights snapped to a per-layer
codebook (centres + integer indices) that is fine-tuned on the training data.

``gq.*`` are the user-level calls (train, compress, save, load, export, search, model surgery);
the maths underneath (mixture densities, the joint objective, snapping, the Han count) is
``gmm_quant.core``. Names load their module on first use: ``import gmm_quant`` imports no orbax,
optuna, onnx, onnxruntime or matplotlib.
"""

from gmm_quant._util.lazy import exports

_API = {
    # configuration and per-layer rules
    "Config": "gmm_quant.run.config",
    "DEFAULT_RULES": "gmm_quant.core.rules",
    "MixtureConfig": "gmm_quant.core.mixture",
    "LearningRates": "gmm_quant.core.objective",
    "Plan": "gmm_quant.core.rules",
    "Rule": "gmm_quant.core.rules",
    "make_plan": "gmm_quant.core.rules",
    # models with state and randomness (BatchNorm, Dropout) trained in train mode
    "from_nnx": "gmm_quant.training.modes",
    "from_linen": "gmm_quant.training.modes",
    "Stateful": "gmm_quant.training.modes",
    # the stages
    "pretrain": "gmm_quant.training.pipeline",
    "retrain": "gmm_quant.training.pipeline",
    "compress": "gmm_quant.core.codebook",
    "finetune": "gmm_quant.training.finetuning",
    "cross_entropy": "gmm_quant.training.tasks",
    "mean_squared_error": "gmm_quant.training.tasks",
    "distillation_loss": "gmm_quant.training.distillation",
    "feature_maps": "gmm_quant.training.distillation",
    "code_float_leaves": "gmm_quant.core.float_codes",
    "error_rate": "gmm_quant.training.loop",
    "summarize": "gmm_quant.core.accounting",
    # files
    "Codebook": "gmm_quant.core.codebook",
    "CorruptFile": "gmm_quant.formats.header_checks",
    "save_compressed": "gmm_quant.formats.storage",
    "load_compressed": "gmm_quant.formats.storage",
    "load_model": "gmm_quant.formats.storage",
    "export_onnx": "gmm_quant.formats.export",
    # the budget search
    "compress_to_budget": "gmm_quant.search.budget",
    # model surgery: attention heads, activation quantisation, cross-layer reuse
    "select_heads": "gmm_quant.surgery.heads",
    "prune_heads": "gmm_quant.surgery.heads",
    "heads_kept": "gmm_quant.surgery.heads",
    "calibrate_activations": ("gmm_quant.surgery.activations", "calibrate"),
    "disconnect_dead_units": ("gmm_quant.surgery.dead_units", "disconnect"),
    "Link": "gmm_quant.surgery.reuse.links",
    "attach_reuse": ("gmm_quant.surgery.reuse.layers", "attach"),
    "choose_reuse": ("gmm_quant.surgery.reuse.choose", "choose"),
}
# The maths, also here by the names earlier releases gave them (``gmm_quant.core`` is their home).
_MATHS = {
    name: "gmm_quant.core"
    for name in (
        "MixtureState", "complexity", "dequantize", "init_mixture", "init_mixtures", "joint_loss",
        "joint_optimizer", "log_density", "log_prob", "make_codebook", "responsibilities",
        "sample_params", "snap", "tau_schedule",
    )
}  # fmt: skip

__getattr__, __dir__ = exports(globals(), {**_API, **_MATHS, "core": ("gmm_quant.core", None)})
__all__ = sorted(_API)
