"""Teacher distillation: the pretrained model teaches its compressed self.

``distillation_loss(apply_fn, teacher_params, alpha=0.5, temperature=4.0)`` is a task loss for
``retrain`` / ``finetune`` (their ``task_loss=``): softmax cross-entropy on the labels plus
``alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))`` averaged over the batch (Hinton et
al., 2015; the T^2 keeps the gradient scale independent of T). The teacher's logits carry no
gradient. With ``alpha == 0`` it is exactly the plain cross-entropy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def distillation_loss(apply_fn, teacher_params, *, alpha: float = 0.5, temperature: float = 4.0):
    """``(params, x, y) -> (loss, {"accuracy", "distill_kl"})``."""
    if alpha < 0 or not temperature > 0:
        raise ValueError(f"alpha must be >= 0 and temperature > 0, got {alpha}, {temperature}")

    def loss(params, x, y):
        logits = apply_fn(params, x)
        task = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        aux = {"accuracy": jnp.mean(jnp.argmax(logits, -1) == y)}
        if alpha == 0:
            return task, aux
        teacher = jax.lax.stop_gradient(apply_fn(teacher_params, x)) / temperature
        p_teacher = jax.nn.softmax(teacher)
        kl = jnp.sum(p_teacher * (jax.nn.log_softmax(teacher) - jax.nn.log_softmax(logits / temperature)), -1)
        kl = kl.mean()
        return task + alpha * temperature**2 * kl, {**aux, "distill_kl": kl}

    return loss
