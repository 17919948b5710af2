"""A small Vision Transformer on MNIST: every attention projection and MLP matrix under the prior.

7x7 patches -> 16 tokens + a class token, width 64, 4 heads, 4 pre-norm blocks (``models/vit.py``).
The class token and position embeddings stay float32 (``keep_float``), as do the LayerNorm scales;
every bias (LayerNorm's included) gets a codebook of its own (``quantise_biases``): at tau 1.0 with
3% of the weights non-zero, float leaves were 80% of the compressed bytes.

Command:  python -m gmm_quant.train --config vit_mnist --data-dir ../shared/data --workdir runs/vit
Runtime:  see BENCHMARKS.md ("A Vision Transformer") for the measured runtime on 2 CPU cores.
Expected: see BENCHMARKS.md for the measured error and compression ratio of these settings.
"""

from gmm_quant.config import Config


def get_config() -> Config:
    return Config(
        model="vit_mnist",
        dataset="mnist",
        batch_size=128,
        pretrain_epochs=20,
        pretrain_lr=1e-3,
        pretrain_cosine=True,
        pretrain_shift=1,
        retrain_epochs=20,
        tau=0.5,
        warmup_epochs=3,
        zero_gamma=(500.0, 0.1),
        gamma=(50.0, 0.01),
        keep_float=("^(cls|position)",),
        quantise_biases=True,
        finetune_epochs=5,
    )
