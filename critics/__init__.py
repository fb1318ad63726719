"""The critic role: the ``MiniCritic`` Ray actor, its value model and which rows each critic trains on."""
