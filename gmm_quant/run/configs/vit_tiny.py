"""Tiny ViT config for tests: 8x8 digits, 4x4 patches, width 32, 2 blocks; every stage in seconds.

Command:  python -m gmm_quant.train --config vit_tiny --workdir /tmp/vit_tiny [--activation-mode w8a8]
Runtime:  about 20 seconds on 2 CPU cores, most of it compiling.
Expected: a report, metrics.json and a verified model.onnx; accuracy is not the point.
"""

from gmm_quant.run.config import Config


def get_config() -> Config:
    return Config(
        model="vit_digits",
        dataset="digits",
        pretrain_epochs=3,
        retrain_epochs=3,
        warmup_epochs=1,
        finetune_epochs=1,
        batch_size=64,
        keep_float=("^(embed|cls|position)",),
        calibration_examples=256,
    )
