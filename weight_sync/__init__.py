"""The learner -> rollout weight broadcast: the protocol, and the sending and receiving halves beside it."""
