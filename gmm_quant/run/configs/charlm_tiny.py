"""Tiny character language model for tests: width 32, 2 blocks, 512 sequences of Python's help text.

Command:  python -m gmm_quant.train --config charlm_tiny --workdir /tmp/charlm_tiny
Runtime:  about 20 seconds on 2 CPU cores, most of it compiling.
Expected: a report with perplexities, metrics.json and a verified model.onnx; quality is not the point.
"""

from gmm_quant.run.config import Config


def get_config() -> Config:
    return Config(
        model="charlm_tiny",
        dataset="pydoc_chars",
        train_subset=512,
        pretrain_epochs=3,
        pretrain_lr=3e-3,
        retrain_epochs=2,
        warmup_epochs=1,
        finetune_epochs=1,
        batch_size=32,
        keep_float=("^position",),
        calibration_examples=64,
    )
