"""The paper's MNIST models and a small MLP for scikit-learn's 8x8 digits."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
from flax import nnx


class MLP(nnx.Module):
    """Fully connected ReLU network over flattened images: sizes[0] -> ... -> sizes[-1]."""

    def __init__(self, sizes, *, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in itertools.pairwise(sizes)])

    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        for layer in self.layers[:-1]:
            x = jax.nn.relu(layer(x))
        return self.layers[-1](x)


class LeNet300_100(MLP):
    """LeNet-300-100: 784-300-100-10, ReLU (266,200 weights)."""

    def __init__(self, *, rngs: nnx.Rngs):
        super().__init__((784, 300, 100, 10), rngs=rngs)


class DigitsMLP(MLP):
    """64-256-128-10 MLP for the 8x8 digits (50,432 weights)."""

    def __init__(self, *, rngs: nnx.Rngs):
        super().__init__((64, 256, 128, 10), rngs=rngs)


class LeNet5Caffe(nnx.Module):
    """LeNet-5-Caffe: conv 20 5x5 -> max-pool 2 -> conv 50 5x5 -> max-pool 2 -> dense 500 -> ReLU ->
    dense 10 (430,500 weights). Convolutions are VALID, as in Caffe's prototxt; input [B, 28, 28, 1].
    """

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 20, (5, 5), padding="VALID", rngs=rngs)
        self.conv2 = nnx.Conv(20, 50, (5, 5), padding="VALID", rngs=rngs)
        self.fc1 = nnx.Linear(800, 500, rngs=rngs)
        self.fc2 = nnx.Linear(500, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.max_pool(self.conv1(x), window_shape=(2, 2), strides=(2, 2))
        x = nnx.max_pool(self.conv2(x), window_shape=(2, 2), strides=(2, 2))
        x = jnp.reshape(x, (x.shape[0], -1))
        return self.fc2(jax.nn.relu(self.fc1(x)))
