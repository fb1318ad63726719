"""The rollout role: the ``RolloutWorker`` Ray actor, one vLLM engine that samples and scores responses."""
