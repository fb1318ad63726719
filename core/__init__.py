"""The algorithm: plain PyTorch, no Ray, no DeepSpeed, no config; every role imports it (docs/algorithms.md)."""
