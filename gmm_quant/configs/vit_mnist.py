"""A small Vision Transformer on MNIST: every attention projection and MLP matrix under the prior.

7x7 patches -> 16 tokens + a class token, width 64, 4 heads, 4 pre-norm blocks (``models/vit.py``).
The patch embedding, class token and position embeddings stay float32 (``keep_float``), as do
LayerNorm scales and all biases (the default). Quantising the biases too (LayerNorm's included) and
tau 0.5 reached 37.5x but at 37% error (BENCHMARKS.md, "A Vision Transformer").

Command:  python -m gmm_quant.train --config vit_mnist --data-dir ../shared/data --workdir runs/vit
Runtime:  about 20 minutes on 2 CPU cores (20 pretraining epochs at 14-24 s, 10 retraining epochs).
Expected: 1.43% test error pretrained (98.6% accuracy), 2.06% after compression at 8.3x (measured by
          bench/vit.py with these settings, 3 fine-tuning epochs).
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
        pretrain_shift=2,
        retrain_epochs=10,
        tau=0.05,
        warmup_epochs=3,
        zero_gamma=(500.0, 0.1),
        gamma=(50.0, 0.01),
        keep_float=("^(embed|cls|position)",),
        finetune_epochs=3,
    )
