"""Training: the epoch loop, the stages as functions (pretrain, retrain, finetune), augmentation,
distillation and the built-in data sets."""
