"""The cluster layer: config, actor groups and placement, DeepSpeed plumbing, the driver, checkpoints, metrics, CLI."""
