"""Tasks: prompt sources, verifiers and the built-in task's models; ``registry.TASKS`` lists them."""
