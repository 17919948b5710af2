"""One run of the pipeline: config and the named configs, work directory, checkpoints and their
checksums, the checks before training, pretrained weights, the report, and ``train_and_evaluate``."""
