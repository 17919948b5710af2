"""LeNet-300-100 on MNIST (paper Table 1: 1.89% -> 1.94% error at 64x).

Command:  python -m gmm_quant.train --config lenet300_100 --data-dir ../shared/data --workdir runs/lenet300
Runtime:  about 15 minutes on 2 CPU cores (with tcmalloc preloaded, see README).
Expected: see BENCHMARKS.md for the measured error and compression ratio of these settings.
"""

from gmm_quant.run.config import Config


def get_config() -> Config:
    return Config(
        model="lenet300_100",
        dataset="mnist",
        batch_size=128,
        pretrain_epochs=30,
        pretrain_lr=1e-3,
        retrain_epochs=30,
        tau=0.05,
        warmup_epochs=5,
        finetune_epochs=5,
    )
