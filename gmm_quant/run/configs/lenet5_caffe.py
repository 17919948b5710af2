"""LeNet-5-Caffe on MNIST (paper Table 1: 0.88% -> 0.97% error at 162x).

Command:  python -m gmm_quant.train --config lenet5_caffe --data-dir ../shared/data --workdir runs/lenet5
Runtime:  about 1.5 hours on 2 CPU cores (with tcmalloc preloaded, see README).
Expected: see BENCHMARKS.md for the measured error and compression ratio of these settings.
"""

from gmm_quant.run.config import Config


def get_config() -> Config:
    return Config(
        model="lenet5_caffe",
        dataset="mnist",
        batch_size=128,
        pretrain_epochs=20,
        pretrain_lr=1e-3,
        retrain_epochs=30,
        tau=0.05,
        warmup_epochs=5,
        finetune_epochs=5,
    )
