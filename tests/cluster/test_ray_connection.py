"""Which Ray cluster a job runs on, and where it listens (docs/deploy.md): without RAY_ADDRESS, always an embedded
cluster of its own, on 127.0.0.1 only."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import psutil
import pytest
import ray
from ray._private.utils import get_ray_address_file, read_ray_address

from asyppo.cluster.driver import Trainer
from asyppo.common.config import build_config
from tests.reference_run import JOB

pytestmark = pytest.mark.cluster



def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback  # ::ffff:127.0.0.1 included


def listening_sockets() -> list[tuple[str, int, str]]:
    """(address, port, process name) of every TCP socket that this process and its descendants (the embedded
    cluster's GCS, raylet, dashboard and agents, every actor and the engines and process groups inside them, the W&B
    service) listen on."""
    me = psutil.Process()
    found = []
    for process in [me, *me.children(recursive=True)]:
        try:
            found += [(c.laddr.ip, c.laddr.port, process.name()) for c in process.net_connections(kind="tcp")
                      if c.status == psutil.CONN_LISTEN]
        except psutil.Error:  # a process that ended meanwhile
            continue
    return found


def test_a_job_with_a_stale_ray_address_file_starts_its_own_cluster_on_loopback_only(tmp_path, monkeypatch):
    """`ray start` leaves Ray's address file behind, also after its cluster died; ray.init() without an address
    would try to join that cluster (and refuse the job's num_cpus). The job starts its own instead, and nothing it
    starts (Ray's servers, its actors, the learner's and the weight broadcast's process groups) listens on another
    address than 127.0.0.1: a job on one machine opens no port to the network."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    address_file = Path(get_ray_address_file(None))
    kept = address_file.read_text() if address_file.exists() else None
    address_file.parent.mkdir(parents=True, exist_ok=True)
    address_file.write_text("127.0.0.1:9")  # a cluster that has died: nothing listens there
    try:
        assert read_ray_address() == "127.0.0.1:9"
        trainer = Trainer(build_config(overrides=[*JOB, f"trainer.run_dir={tmp_path}", "trainer.name=local",
                                                  "trainer.steps=1"]))
        try:
            assert trainer.owns_ray and ray.get_runtime_context().gcs_address != "127.0.0.1:9"
            trainer.step(0)  # every process group formed and used
            sockets = listening_sockets()
        finally:
            trainer.close()
    finally:
        if kept is None:
            address_file.unlink(missing_ok=True)
        else:
            address_file.write_text(kept)
    names = {name for _, _, name in sockets}
    assert {"gcs_server", "raylet"} <= names and any("Learner" in name for name in names), names
    assert [entry for entry in sockets if not is_loopback(entry[0])] == []
