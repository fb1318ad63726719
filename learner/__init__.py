"""The learner role: the ``Learner`` Ray actor that owns the policy and runs the PPO + ERC update."""
