"""Tiny config for tests: digits, few epochs; exercises every stage in seconds.

Command:  python -m gmm_quant.train --config tiny --workdir /tmp/tiny
Runtime:  about 10 seconds on 2 CPU cores.
Expected: a report and metrics.json; accuracy is not the point.
"""

from gmm_quant.run.config import Config


def get_config() -> Config:
    return Config(
        model="digits_mlp",
        dataset="digits",
        pretrain_epochs=3,
        retrain_epochs=4,
        warmup_epochs=1,
        finetune_epochs=1,
        batch_size=64,
    )
