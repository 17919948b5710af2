"""Model definitions (Flax NNX), looked up by name. Imports nothing from ``gmm_quant``.

Image models take ``[batch, height, width, channels]`` (NHWC, float32) and return logits; the
character language models take ``int32 [batch, length]`` codes and return ``[batch, length, vocab]``.
"""

from __future__ import annotations

from flax import nnx

from models.charlm import CharLM, charlm_pydoc, charlm_tiny
from models.cnn import GapCNN, SmallCNN
from models.lenet import DigitsMLP, LeNet5Caffe, LeNet300_100
from models.vit import ViT, vit_digits, vit_mnist

MODELS = {
    "digits_mlp": DigitsMLP,
    "lenet300_100": LeNet300_100,
    "lenet5_caffe": LeNet5Caffe,
    "small_cnn": SmallCNN,
    "gap_cnn": GapCNN,
    "vit_mnist": vit_mnist,
    "vit_digits": vit_digits,
    "charlm_pydoc": charlm_pydoc,
    "charlm_tiny": charlm_tiny,
}


def create(name: str, seed: int = 0, **kwargs) -> nnx.Module:
    """A freshly initialised model by name (see ``MODELS``)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](rngs=nnx.Rngs(seed), **kwargs)


__all__ = [
    "MODELS",
    "CharLM",
    "DigitsMLP",
    "GapCNN",
    "LeNet5Caffe",
    "LeNet300_100",
    "SmallCNN",
    "ViT",
    "create",
]
