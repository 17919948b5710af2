"""LeNet-5-Caffe on MNIST (paper Table 1: 0.88% -> 0.97% error at 162x).

Command:  python -m gmm_quant.train --config lenet5_caffe --data-dir ../shared/data --workdir runs/lenet5
Runtime:  about 10 minutes on 2 CPU cores with tcmalloc preloaded (575 s measured in December 2026:
          pretraining 190 s, retraining 323 s, compression and fine-tuning 54 s).
Expected: 1.32% -> 1.10% test error at 99.0x (Han) in that run; BENCHMARKS.md has the table.
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
