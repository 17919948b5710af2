"""Experiment configuration: one frozen dataclass, validated before any training.

Each experiment is a module in ``gmm_quant/run/configs/`` with ``get_config() -> Config`` and a docstring
giving its command, runtime on 2 CPU cores and expected result. Every field can be overridden on the
command line (``--tau 0.01``, ``--keep-float 'layers/2/'``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pathlib
import re

from gmm_quant.core.codebook import ASSIGNMENTS
from gmm_quant.scale.mesh import parse_mesh
from gmm_quant.surgery.reuse.links import parse_rule
from gmm_quant.training import defaults
from gmm_quant.training.data import DATASETS
from gmm_quant.training.user_data import TASKS, is_loader_spec

HEAD_SCORES = ("weights", "loss")
ACTIVATION_MODES = {"w8a8": (8, 8), "w4a8": (4, 8), "w4a16": (4, None)}  # weight bits, activation bits
STAGES = ("pretrain", "retrain", "compress", "finetune")
FACTORY = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")  # package.module:factory


@dataclasses.dataclass(frozen=True)
class Config:
    # Defaults shared with the Python API are defined once, in ``gmm_quant.training.defaults``.
    # --- data and model ---
    model: str = "digits_mlp"  # a name in models.MODELS, or your own package.module:factory (an NNX module)
    dataset: str = "digits"  # digits, mnist (--data-dir), pydoc_chars, or yours: .npz, module:loader, HF dir
    data_columns: tuple[str, ...] = ("x", "y")  # a Hugging Face datasets directory's input and label columns
    task: str = "classify"  # classify (error rate), regress (MSE loss, RMSE) or sequence (labels [N, L])
    train_subset: int = 0  # use only the first N training examples (0 = all)
    val_fraction: float = 0.1  # held out of the training data (seeded) for every selection decision
    seed: int = defaults.SEED  # model init and batch order
    batch_size: int = defaults.BATCH_SIZE  # mini-batch size of every stage
    # --- stage 1: pretraining ---
    pretrain_epochs: int = defaults.PRETRAIN_EPOCHS  # 0 skips pretraining (e.g. with --pretrained)
    pretrain_lr: float = defaults.PRETRAIN_LR  # Adam learning rate
    pretrain_cosine: bool = False  # decay the pretraining learning rate along a cosine to 0
    pretrain_shift: int = 0  # shift training images by up to this many pixels while pretraining
    # --- between pretraining and retraining: attention heads (models with nnx.MultiHeadAttention) ---
    head_threshold: float = 0.0  # remove heads scoring below this x their layer's best (0 = keep all)
    head_ratio: float = 0.0  # or remove this fraction of each layer's heads, lowest scores first (0 = none)
    head_score: str = "weights"  # "weights" (Q/K/V norms) or "loss" (validation loss rise when masked)
    # --- then: layers reusing an earlier layer's weights plus a transform (gmm_quant.reuse) ---
    reuse: tuple[str, ...] = ()  # "TARGET_REGEX=SOURCE_PATH", e.g. "blocks/[23]/mlp_in$=blocks/1/mlp_in"
    reuse_budget: float = 0.0  # > 0 (and no rules): choose links greedily within this many error points
    reuse_rank: int = 0  # rank of each link's low-rank correction (0: per-channel scale and bias only)
    # --- stage 2: retraining with the mixture prior ---
    retrain_epochs: int = defaults.RETRAIN_EPOCHS  # epochs of joint training of weights and mixture
    tau: float = defaults.TAU  # prior strength; loss = mean task loss + tau / N * complexity
    warmup_epochs: int = defaults.WARMUP_EPOCHS  # tau rises linearly from 0 over these epochs
    lr_weights: float = defaults.RATES.weights  # Adam learning rate of the weights while retraining
    lr_means: float = defaults.RATES.means  # Adam learning rate of the free component means
    lr_log_precisions: float = defaults.RATES.log_precisions  # Adam learning rate of the log-precisions
    lr_mixing: float = defaults.RATES.mixing  # Adam learning rate of the mixing logits
    retrain_tightness: float = defaults.TIGHTNESS  # > 0: past retrain_epochs (to 4x) until this tight
    snap_epochs: int = defaults.SNAP_EPOCHS  # > 0: the last N retraining epochs see the weights snapped
    mixture_every: int = 1  # > 1: the mixture learns on every k-th step only (skips the prior's histogram)
    num_components: int = defaults.MIXTURE.num_components  # J, including the zero component
    pi_zero: float = defaults.MIXTURE.pi_zero  # mixing proportion of the zero component
    learn_pi_zero: bool = defaults.MIXTURE.learn_pi_zero  # learn pi_0 under a Beta hyper-prior
    zero_gamma: tuple[float, float] = defaults.MIXTURE.zero_gamma  # Gamma(alpha, beta) on the zero precision
    gamma: tuple[float, float] = defaults.MIXTURE.gamma  # Gamma(alpha, beta) on the other precisions
    init_std: float = 0.0  # initial component std (0 = weight range / 5)
    keep_float: tuple[str, ...] = ()  # regexes of weight paths kept float32 (no prior, no codebook)
    own_mixture: tuple[str, ...] = ()  # regexes of layers that each get a mixture of their own
    per_slice: tuple[str, ...] = ()  # regexes of stacked weights (blocks on axis 0): a codebook per block
    quantise_biases: bool = False  # biases get a prior and a codebook too (one mixture per bias)
    unit_prior: tuple[str, ...] = ()  # "REGEX=STRENGTH": a group prior drives those kernels' units to 0
    distill_alpha: float = 0.0  # > 0: the pretrained model teaches retraining and fine-tuning (KL weight)
    distill_temperature: float = 4.0  # softmax temperature of the distillation term
    distill_features: str = ""  # regex of module paths whose outputs the student matches (relative MSE)
    distill_beta: float = 1.0  # weight of the feature-map term of distill_features
    # --- where it trains (gmm_quant.scale) ---
    mesh: str = ""  # device mesh, e.g. "data=4" or "data=2,model=2" ("" = one device)
    shard_params: tuple[str, ...] = ()  # regexes of parameters split over the mesh's model axis (FSDP)
    # --- stage 3: compression ---
    assignment: str = "nearest"  # "nearest" centre or maximum "responsibility"
    prune_threshold: float = 0.0  # prune components with <= this many members (< 1: fraction)
    layer_prune: tuple[str, ...] = ()  # per-layer thresholds "REGEX=VALUE" (first match wins)
    merge_kl: float = 0.0  # merge components closer than this KL (0 = no merging)
    # --- stage 4: codebook fine-tuning ---
    finetune_epochs: int = defaults.FINETUNE_EPOCHS  # epochs of centre fine-tuning (0 skips)
    finetune_lr: float = defaults.FINETUNE_LR  # Adam learning rate of the centres (and biases)
    grid_bits: int = 0  # > 0: centres on an evenly spaced signed grid of this many bits (ONNX grid)
    float_bits: int = 0  # 2..8: leaves outside the prior (biases, LayerNorm, keep_float) as codes
    activation_mode: str = ""  # "w8a8", "w4a8" or "w4a16": weight grid and activation widths ("" off)
    activation_layers: str = ".*"  # regex of the Linear / LinearGeneral layers whose input is quantised
    calibration_examples: int = 1024  # training examples that set the activation ranges

    @property
    def weight_bits(self) -> int:
        """Bits of the weights' evenly spaced grid: ``grid_bits``, or the activation mode's (0: none)."""
        return self.grid_bits or (ACTIVATION_MODES[self.activation_mode][0] if self.activation_mode else 0)

    def fingerprint(self) -> str:
        """Hash of every field: checkpoints are only resumed under the same config."""
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:16]


class ConfigError(ValueError):
    """An invalid config value; the message names the field."""


def _check(cond: bool, field: str, message: str, value) -> None:
    if not cond:
        raise ConfigError(f"invalid config field {field!r} = {value!r}: {message}")


def validate(cfg: Config) -> Config:
    """Reject invalid values before any training, naming the field."""
    import models

    _check_finite(cfg)
    _check(
        cfg.model in models.MODELS or FACTORY.fullmatch(cfg.model) is not None,
        "model",
        f"unknown model; choose one of {sorted(models.MODELS)} or name your own as package.module:factory",
        cfg.model,
    )
    known = cfg.dataset in DATASETS or is_loader_spec(cfg.dataset) or pathlib.Path(cfg.dataset).exists()
    _check(
        known,
        "dataset",
        f"not one of {DATASETS}, no such file or directory, nor a module:loader",
        cfg.dataset,
    )
    _check(len(cfg.data_columns) == 2, "data_columns", "two column names: input, label", cfg.data_columns)
    _check(cfg.task in TASKS, "task", f"choose one of {TASKS}", cfg.task)
    distills = cfg.distill_alpha or cfg.distill_features
    _check(not (cfg.task == "regress" and distills), "task", "distillation is for classifiers", cfg.task)
    _check(cfg.assignment in ASSIGNMENTS, "assignment", f"choose one of {ASSIGNMENTS}", cfg.assignment)
    _check(cfg.tau >= 0, "tau", "must be >= 0", cfg.tau)
    _check(cfg.num_components >= 2, "num_components", "must be >= 2 (zero + one free)", cfg.num_components)
    _check(0 < cfg.pi_zero < 1, "pi_zero", "must be in (0, 1)", cfg.pi_zero)
    _check(cfg.batch_size >= 1, "batch_size", "must be >= 1", cfg.batch_size)
    for name in ("pretrain_epochs", "retrain_epochs", "warmup_epochs", "finetune_epochs", "train_subset",
                 "pretrain_shift"):  # fmt: skip
        _check(getattr(cfg, name) >= 0, name, "must be >= 0", getattr(cfg, name))
    for name in ("pretrain_lr", "lr_weights", "lr_means", "lr_log_precisions", "lr_mixing", "finetune_lr"):
        _check(getattr(cfg, name) > 0, name, "must be > 0", getattr(cfg, name))
    for name in ("zero_gamma", "gamma"):
        value = getattr(cfg, name)
        _check(len(value) == 2 and min(value) > 0, name, "needs two values > 0 (alpha, beta)", value)
    _check(cfg.init_std >= 0, "init_std", "must be >= 0", cfg.init_std)
    _check(0 <= cfg.val_fraction < 1, "val_fraction", "must be in [0, 1)", cfg.val_fraction)
    _check(cfg.distill_alpha >= 0, "distill_alpha", "must be >= 0", cfg.distill_alpha)
    _check(cfg.distill_beta >= 0, "distill_beta", "must be >= 0", cfg.distill_beta)
    _check(_compiles(cfg.distill_features), "distill_features", "not a valid regex", cfg.distill_features)
    _check(cfg.distill_temperature > 0, "distill_temperature", "must be > 0", cfg.distill_temperature)
    try:
        parse_mesh(cfg.mesh)
    except ValueError as err:
        raise ConfigError(f"invalid config field 'mesh' = {cfg.mesh!r}: {err}") from None
    for pattern in cfg.shard_params:
        _check(_compiles(pattern), "shard_params", "not a valid regular expression", pattern)
    _check(cfg.merge_kl >= 0, "merge_kl", "must be >= 0", cfg.merge_kl)
    bits = cfg.grid_bits
    _check(bits == 0 or 2 <= bits <= 8, "grid_bits", "must be 0 (off) or 2..8", bits)
    fbits = cfg.float_bits
    _check(fbits == 0 or 2 <= fbits <= 8, "float_bits", "must be 0 (float32) or 2..8", fbits)
    _check(cfg.prune_threshold >= 0, "prune_threshold", "must be >= 0", cfg.prune_threshold)
    layer_thresholds(cfg)
    unit_strengths(cfg)
    modes = ("", *ACTIVATION_MODES)
    _check(cfg.activation_mode in modes, "activation_mode", f"choose one of {modes}", cfg.activation_mode)
    if cfg.activation_mode:
        wbits = ACTIVATION_MODES[cfg.activation_mode][0]
        same = cfg.grid_bits in (0, wbits)
        _check(same, "grid_bits", f"conflicts with activation_mode {cfg.activation_mode!r}", cfg.grid_bits)
    _check(_compiles(cfg.activation_layers), "activation_layers", "not a valid regex", cfg.activation_layers)
    _check(cfg.calibration_examples >= 1, "calibration_examples", "must be >= 1", cfg.calibration_examples)
    above = "must be in [0, 1]: above 1 every head of every layer would go"
    _check(0 <= cfg.head_threshold <= 1, "head_threshold", above, cfg.head_threshold)
    _check(0 <= cfg.head_ratio < 1, "head_ratio", "must be in [0, 1)", cfg.head_ratio)
    both = cfg.head_threshold and cfg.head_ratio
    _check(not both, "head_ratio", "give head_threshold or head_ratio, not both", cfg.head_ratio)
    _check(cfg.head_score in HEAD_SCORES, "head_score", f"choose one of {HEAD_SCORES}", cfg.head_score)
    _check(cfg.reuse_budget >= 0, "reuse_budget", "must be >= 0 (points of error)", cfg.reuse_budget)
    _check(cfg.reuse_rank >= 0, "reuse_rank", "must be >= 0", cfg.reuse_rank)
    _check(cfg.snap_epochs >= 0, "snap_epochs", "must be >= 0 (epochs)", cfg.snap_epochs)
    _check(cfg.mixture_every >= 1, "mixture_every", "must be >= 1 (steps)", cfg.mixture_every)
    tight = cfg.retrain_tightness
    _check(tight >= 0, "retrain_tightness", "must be >= 0 (0: fixed epochs)", tight)
    both = bool(cfg.reuse) and cfg.reuse_budget > 0
    _check(not both, "reuse_budget", "give reuse rules or a reuse budget, not both", cfg.reuse_budget)
    for item in cfg.reuse:
        try:
            parse_rule(item)
        except ValueError as err:
            raise ConfigError(f"invalid config field 'reuse': {err}") from None
    for name in ("keep_float", "own_mixture", "per_slice"):
        for pattern in getattr(cfg, name):
            _check(_compiles(pattern), name, "not a valid regular expression", pattern)
    return cfg


def _compiles(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True


def changed_fields(cfg: Config) -> dict:
    """The fields of ``cfg`` that differ from the defaults (``model`` and ``dataset`` always), JSON-ready:
    what a ``.gqz`` records of its run, in a few dozen bytes (the workdir's config.json has them all);
    ``Config(**changed_fields(cfg))`` rebuilds ``cfg`` under the same defaults."""
    default = Config()
    return {
        f.name: list(v) if isinstance(v, tuple) else v
        for f in dataclasses.fields(cfg)
        if (v := getattr(cfg, f.name)) != getattr(default, f.name) or f.name in ("model", "dataset")
    }


def layer_thresholds(cfg: Config) -> list[tuple[str, float]]:
    """``layer_prune`` as [(regex, threshold)], each checked."""
    return _layer_values(cfg, "layer_prune", "THRESHOLD")


def unit_strengths(cfg: Config) -> list[tuple[str, float]]:
    """``unit_prior`` as [(regex, strength)], each checked."""
    return _layer_values(cfg, "unit_prior", "STRENGTH")


def _layer_values(cfg: Config, name: str, what: str) -> list[tuple[str, float]]:
    out = []
    for item in getattr(cfg, name):
        pattern, sep, value = item.rpartition("=")
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        ok = bool(sep) and _compiles(pattern) and math.isfinite(number) and number >= 0
        _check(ok, name, f"each item must be REGEX={what} with a finite {what.lower()} >= 0", item)
        out.append((pattern, number))
    return out


def _check_finite(cfg: Config) -> None:
    """Every float (and every element of a float pair) must be a finite number: no inf, no NaN."""
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        values = value if isinstance(value, tuple) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            _check(False, field.name, "must be finite (no inf or nan)", value)


def check_threshold(cfg: Config, layer_sizes: dict) -> None:
    """A count threshold above a quantised layer's size would prune every component."""
    for path, size in layer_sizes.items():
        t = cfg.prune_threshold
        _check(t < 1 or t < size, "prune_threshold", f"exceeds the {size} weights of layer {path}", t)


def load_file(path) -> Config:
    """A config from a JSON file of Config fields (as ``python -m gmm_quant.tune`` writes), validated."""
    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
    except json.JSONDecodeError as err:
        raise ConfigError(f"config file {path}: not valid JSON ({err.msg}, line {err.lineno})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path}: not a text (UTF-8 JSON) file") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path}: expected a JSON object of config fields")
    kinds = {f.name: f for f in dataclasses.fields(Config)}
    unknown = sorted(set(values) - set(kinds))
    if unknown:
        raise ConfigError(f"config file {path}: unknown config fields {unknown}")
    return override(Config(), {k: _from_json(kinds[k], v, path) for k, v in values.items()})


def _from_json(field: dataclasses.Field, value, path):
    kind = field.type if isinstance(field.type, str) else field.type.__name__
    ok = {
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, int | float) and not isinstance(value, bool),
        "str": isinstance(value, str),
    }.get(kind, isinstance(value, list))
    if ok and kind.startswith("tuple[float"):
        ok = all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    if ok and kind.startswith("tuple[str"):
        ok = all(isinstance(v, str) for v in value)
    if not ok:
        raise ConfigError(f"config file {path}: field {field.name!r} = {value!r}: expected {kind}")
    if kind == "float":
        return float(value)
    if kind.startswith("tuple[float"):
        return tuple(float(v) for v in value)
    if kind.startswith("tuple[str"):
        return tuple(str(v) for v in value)
    return value


def _parse(field: dataclasses.Field, text: str):
    kind = field.type if isinstance(field.type, str) else field.type.__name__
    try:
        if kind == "bool":
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes")
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
        if kind.startswith("tuple[float"):
            return tuple(float(v) for v in text.split(","))
        if kind.startswith("tuple[str"):
            return tuple(v for v in text.split(",") if v)
        return text
    except ValueError:
        raise ConfigError(f"invalid config field {field.name!r} = {text!r}: expected {kind}") from None


def override(cfg: Config, values: dict) -> Config:
    """``cfg`` with fields replaced from ``{name: string}`` (command-line text), then validated."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    changes = {}
    for name, text in values.items():
        if name not in fields:
            raise ConfigError(f"unknown config field {name!r}")
        changes[name] = _parse(fields[name], text) if isinstance(text, str) else text
    return validate(dataclasses.replace(cfg, **changes))


def fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(Config))


_FIELD_LINE = re.compile(r"^    (\w+): [^=]+ = .*?  # (.+)$")
_SECTION_LINE = re.compile(r"^    # --- (.+) ---$")


def field_help() -> dict[str, tuple[str, str]]:
    """``{field: (section, help)}`` read from this class's source, the one documented place: each
    field's comment is its help line and the ``# --- section ---`` lines above group them."""
    import inspect

    out, section = {}, ""
    for line in inspect.getsource(Config).splitlines():
        if match := _SECTION_LINE.match(line):
            section = match.group(1)
        elif match := _FIELD_LINE.match(line):
            out[match.group(1)] = (section, match.group(2))
    return out
