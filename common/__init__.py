"""What the roles and the cluster layer both stand on: the job config, the DeepSpeed engine plumbing, addresses and
ports, durable file writes. It imports no role and no ``asyppo.cluster`` module (tests/unit/test_layering.py)."""
