"""Which Ray cluster a job runs on (docs/deploy.md): without RAY_ADDRESS, always an embedded one of its own."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
from ray._private.utils import get_ray_address_file, read_ray_address

from asyppo.cluster.supervisor import connect_ray
from asyppo.common.config import build_config

pytestmark = pytest.mark.cluster


def test_an_embedded_cluster_starts_whatever_cluster_ray_address_file_names(monkeypatch):
    """`ray start` leaves Ray's address file behind, also after its cluster died; ray.init() without an address
    would try to join that cluster (and refuse the job's num_cpus). The job starts its own instead."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    address_file = Path(get_ray_address_file(None))
    kept = address_file.read_text() if address_file.exists() else None
    address_file.parent.mkdir(parents=True, exist_ok=True)
    address_file.write_text("127.0.0.1:9")  # a cluster that has died: nothing listens there
    try:
        assert read_ray_address() == "127.0.0.1:9"
        assert connect_ray(build_config(overrides=["logging.wandb_mode=disabled"])) is True
        assert ray.is_initialized() and ray.cluster_resources()["CPU"] >= 1
        assert ray.get_runtime_context().gcs_address != "127.0.0.1:9"
    finally:
        ray.shutdown()
        if kept is None:
            address_file.unlink(missing_ok=True)
        else:
            address_file.write_text(kept)
