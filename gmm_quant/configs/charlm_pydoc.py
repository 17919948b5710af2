"""A character-level language model of Python's help topics: every attention and MLP matrix, the
character embedding and the output layer under the prior; position embeddings, LayerNorm and biases
stay float32. Validation perplexity (per character) is what the report and a budget look at.

Model: ``models/charlm.py`` (64 characters of context, width 128, 4 heads, 4 causal pre-norm blocks).
Data: ``pydoc_data.topics`` of the running Python, 64-character windows; the last 10% of the text
is the test set.

Command:  python -m gmm_quant.train --config charlm_pydoc --workdir runs/charlm
Runtime:  about 11 minutes on 2 CPU cores (pretraining 7, retraining 3, fine-tuning and export 1).
Expected: test perplexity 5.32 pretrained, 7.09 after compression at 8.0x (BENCHMARKS.md, "A character
          language model": the +2% perplexity target is missed).
"""

from gmm_quant.config import Config


def get_config() -> Config:
    return Config(
        model="charlm_pydoc",
        dataset="pydoc_chars",
        batch_size=64,
        pretrain_epochs=30,
        pretrain_lr=2e-3,
        pretrain_cosine=True,
        retrain_epochs=10,
        tau=0.05,
        warmup_epochs=3,
        zero_gamma=(500.0, 0.1),
        gamma=(50.0, 0.01),
        keep_float=("^position",),
        finetune_epochs=3,
        calibration_examples=512,
    )
