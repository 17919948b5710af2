"""Teacher distillation: the pretrained model teaches its compressed self.

``distillation_loss(apply_fn, teacher_params, alpha=0.5, temperature=4.0)`` is a task loss for
``retrain`` / ``finetune`` (their ``task_loss=``): softmax cross-entropy on the labels plus
``alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))`` averaged over the batch (Hinton et
al., 2015; the T^2 keeps the gradient scale independent of T). The teacher carries no gradient.
With ``alpha == 0`` (and no feature term) it is exactly the plain cross-entropy.

Feature maps: ``features=feature_maps(graphdef, "conv|fc1")`` (any ``(params, x) -> (logits,
{name: array})``) adds ``beta * mean over maps of ||student - teacher||^2 / ||teacher||^2``, the
squared error of each intermediate output relative to the teacher's own energy on the batch, so
that one ``beta`` serves maps of any scale (FitNets, Romero et al., 2015, without the regressor:
student and teacher have the same architecture).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from gmm_quant.training import modes


def feature_maps(graphdef, pattern: str):
    """``(params, x) -> (logits, {module path: output})`` for the NNX modules whose path (``/``-joined,
    e.g. ``blocks/0/mlp``) matches the regex ``pattern``. Uses ``nnx.capture``: no model code changes."""
    regex = re.compile(pattern)

    def run(params, x):
        model = nnx.merge(graphdef, params)
        logits, sown = nnx.capture(model, nnx.Intermediate, method_outputs=nnx.Intermediate)(x)
        maps = {}
        for path, value in nnx.to_flat_state(sown):
            if path[-1] != "__call__" or len(path) < 2:
                continue  # other methods, and the model's own output (the logits)
            name = "/".join(str(k) for k in path[:-1])
            if regex.search(name):
                sown_value = value.get_value()
                maps[name] = sown_value[0] if isinstance(sown_value, tuple) else sown_value
        if not maps:
            raise ValueError(f"feature distillation: no module path matches {pattern!r}")
        return logits, maps

    return run


def feature_mse(student: dict, teacher: dict):
    """Mean over maps of ``sum((s - t)^2) / sum(t^2)`` (teacher without gradient)."""
    terms = []
    for name, t in teacher.items():
        t = jax.lax.stop_gradient(t)
        terms.append(jnp.sum((student[name] - t) ** 2) / (jnp.sum(t**2) + 1e-12))
    return sum(terms) / len(terms)


def distillation_loss(
    apply_fn, teacher_params, *, alpha=0.5, temperature=4.0, features=None, beta=1.0, teacher_model=None
):
    """``(params, x, y) -> (loss, {"accuracy", "distill_kl", "distill_features"})``. ``teacher_model``
    = ``(apply_fn, features)`` of the teacher when its structure differs from the student's (a
    student whose layers reuse others); by default the student's own."""
    if alpha < 0 or not temperature > 0 or beta < 0:
        raise ValueError(f"alpha, beta must be >= 0 and temperature > 0, got {alpha}, {beta}, {temperature}")
    use_features = features is not None and beta > 0
    teacher_fn, teacher_features = teacher_model or (apply_fn, features)

    def loss(teacher_params, params, x, y, **mode):  # mode: train mode of a Stateful student
        state = {}
        if use_features:
            if mode:
                raise NotImplementedError("feature distillation of a model with state (BatchNorm, Dropout)")
            logits, maps = features(params, x)
            teacher_logits, teacher_maps = teacher_features(teacher_params, x)
        else:
            logits, state = modes.outputs(apply_fn, params, x, mode)  # the teacher: eval mode
        task = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        aux = {**state, "accuracy": jnp.mean(jnp.argmax(logits, -1) == y)}
        if alpha > 0:
            if not use_features:
                teacher_logits = teacher_fn(teacher_params, x)
            teacher = jax.lax.stop_gradient(teacher_logits) / temperature
            log_student = jax.nn.log_softmax(logits / temperature)
            kl = jnp.sum(jax.nn.softmax(teacher) * (jax.nn.log_softmax(teacher) - log_student), -1)
            aux["distill_kl"] = kl.mean()
            task = task + alpha * temperature**2 * aux["distill_kl"]
        if use_features:
            aux["distill_features"] = feature_mse(maps, teacher_maps)
            task = task + beta * aux["distill_features"]
        return task, aux

    return jax.tree_util.Partial(loss, teacher_params)  # the teacher reaches jit as an argument
