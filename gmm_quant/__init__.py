"""gmm_quant: compress neural networks by Bayesian soft weight-sharing (Ullrich et al., 2017).

A Gaussian mixture prior over the weights is trained jointly with them; then each layer's weights are
assigned to mixture components, sparse components pruned, and the weights snapped to a per-layer
codebook (centres + integer indices) that is fine-tuned on the training data.
"""

from gmm_quant.accounting import summarize
from gmm_quant.codebook import Codebook, compress, dequantize, make_codebook, snap
from gmm_quant.config import Config
from gmm_quant.distillation import distillation_loss, feature_maps
from gmm_quant.float_codes import code_float_leaves
from gmm_quant.init import sample_params
from gmm_quant.loop import error_rate
from gmm_quant.mixture import (
    MixtureConfig,
    MixtureState,
    complexity,
    init_mixture,
    log_density,
    log_prob,
    responsibilities,
)
from gmm_quant.objective import (
    LearningRates,
    init_mixtures,
    joint_loss,
    joint_optimizer,
    tau_schedule,
)
from gmm_quant.pipeline import cross_entropy, finetune, pretrain, retrain
from gmm_quant.rules import DEFAULT_RULES, Plan, Rule, make_plan
from gmm_quant.search import compress_to_budget
from gmm_quant.storage import CorruptFile, load_compressed, load_model, save_compressed


def __getattr__(name):
    """``gq.export_onnx`` without importing onnx until it is used (onnx is an optional extra)."""
    if name == "export_onnx":
        from gmm_quant.export import export_onnx

        return export_onnx
    raise AttributeError(f"module 'gmm_quant' has no attribute {name!r}")


__all__ = [
    "DEFAULT_RULES",
    "Codebook",
    "Config",
    "CorruptFile",
    "LearningRates",
    "MixtureConfig",
    "MixtureState",
    "Plan",
    "Rule",
    "code_float_leaves",
    "complexity",
    "compress",
    "compress_to_budget",
    "cross_entropy",
    "dequantize",
    "distillation_loss",
    "error_rate",
    "export_onnx",
    "feature_maps",
    "finetune",
    "init_mixture",
    "init_mixtures",
    "joint_loss",
    "joint_optimizer",
    "load_compressed",
    "load_model",
    "log_density",
    "log_prob",
    "make_codebook",
    "make_plan",
    "pretrain",
    "responsibilities",
    "retrain",
    "sample_params",
    "save_compressed",
    "snap",
    "summarize",
    "tau_schedule",
]
