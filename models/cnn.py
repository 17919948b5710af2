"""A small CNN of the kind users bring: 3x3 convolutions with SAME padding and average pooling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class SmallCNN(nnx.Module):
    """conv 16 3x3 -> ReLU -> avg-pool 2 -> conv 32 3x3 -> ReLU -> avg-pool 2 -> dense 128 -> ReLU ->
    dense 10 on [B, 28, 28, 1] (206,592 weights; 4,608 of them in the convolutions)."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 16, (3, 3), padding="SAME", rngs=rngs)
        self.conv2 = nnx.Conv(16, 32, (3, 3), padding="SAME", rngs=rngs)
        self.fc1 = nnx.Linear(7 * 7 * 32, 128, rngs=rngs)
        self.fc2 = nnx.Linear(128, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.avg_pool(jax.nn.relu(self.conv1(x)), window_shape=(2, 2), strides=(2, 2))
        x = nnx.avg_pool(jax.nn.relu(self.conv2(x)), window_shape=(2, 2), strides=(2, 2))
        x = jnp.reshape(x, (x.shape[0], -1))
        return self.fc2(jax.nn.relu(self.fc1(x)))


class GapCNN(nnx.Module):
    """All-convolutional: conv 32 3x3 -> avg-pool 2 -> conv 64 3x3 -> avg-pool 2 -> conv 64 3x3 ->
    global average pool -> dense 10, ReLU after each conv, on [B, 28, 28, 1] (55,936 weights, 99% of
    them in the convolutions)."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 32, (3, 3), padding="SAME", rngs=rngs)
        self.conv2 = nnx.Conv(32, 64, (3, 3), padding="SAME", rngs=rngs)
        self.conv3 = nnx.Conv(64, 64, (3, 3), padding="SAME", rngs=rngs)
        self.head = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.avg_pool(jax.nn.relu(self.conv1(x)), window_shape=(2, 2), strides=(2, 2))
        x = nnx.avg_pool(jax.nn.relu(self.conv2(x)), window_shape=(2, 2), strides=(2, 2))
        x = jax.nn.relu(self.conv3(x))
        return self.head(jnp.mean(x, axis=(1, 2)))
