"""Every stage's defaults, defined once.

The Python API (``gq.pretrain``, ``gq.retrain``, ``gq.finetune``), ``Config`` (the command line and
the search) and ``formats.export`` take their defaults from here, so that a model trained through
either path with nothing set trains the same way (``tests/test_defaults.py`` runs both). The values
are the command line's as they stood when the two were joined (issue 23); a named config
(``gmm_quant/run/configs/``) sets what its experiment needs on top of them.
"""

from __future__ import annotations

from gmm_quant.core.mixture import MixtureConfig
from gmm_quant.core.objective import LearningRates

SEED = 0  # model initialisation and batch order
BATCH_SIZE = 64  # mini-batch size of every stage
PRETRAIN_EPOCHS = 30
PRETRAIN_LR = 1e-3  # Adam
RETRAIN_EPOCHS = 100  # joint training of weights and mixture
TAU = 2e-3  # prior strength: loss = mean task loss + tau / N * complexity
WARMUP_EPOCHS = 5  # tau rises linearly from 0 over these epochs
RATES = LearningRates()  # Adam learning rates of weights, means, log-precisions, mixing logits
TIGHTNESS = 0.0  # > 0: retraining goes on (to 4x its epochs) until the weights are this tight; 0: off
MIXTURE = MixtureConfig()  # 17 components, pi_zero 0.999, the hyper-priors of the reference tutorial
SNAP_EPOCHS = 0  # > 0: the last retraining epochs see the weights snapped (straight-through)
FINETUNE_EPOCHS = 10  # codebook fine-tuning
FINETUNE_LR = 1e-4  # Adam, centres (and float leaves)
