"""Addresses and ports of the job's own servers: the process groups' stores and a cluster of the job's own.

Light on purpose (no torch): the Ray task that finds the learner's address and port imports only this module, so it
answers in a moment instead of after torch and transformers have loaded (docs/deploy.md, "Network").
"""

from __future__ import annotations

import contextlib
import socket
from typing import Iterator

LOOPBACK = "127.0.0.1"


def address_family(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def free_port(address: str = "") -> int:
    """A TCP port free on ``address`` (every interface by default) at the time of the call."""
    with socket.socket(address_family(address), socket.SOCK_STREAM) as sock:
        sock.bind((address, 0))
        return sock.getsockname()[1]


def node_address_and_free_port() -> tuple[str, int]:
    """This node's address in the Ray cluster and a port free on it: run as a Ray task on the node that will serve
    a process group's store."""
    import ray

    address = ray.util.get_node_ip_address()
    return address, free_port(address)


def loopback_interface() -> str | None:
    """The name of the network interface that holds 127.0.0.1 (``lo`` on Linux), if any."""
    import psutil

    for name, addresses in psutil.net_if_addrs().items():
        if any(entry.address == LOOPBACK for entry in addresses):
            return name
    return None


def is_loopback_address(address: str) -> bool:
    """Whether a Ray address (``host:port``, ``ray://host:port``, ``auto``) names this machine's loopback."""
    from urllib.parse import urlsplit

    host = urlsplit(address if "://" in address else f"//{address}").hostname or ""
    return host == "localhost" or host == "::1" or host.startswith("127.")


@contextlib.contextmanager
def keep_loopback_node_address() -> Iterator[None]:
    """Within it, Ray keeps a node address of 127.0.0.1 (starting a node, or a driver joining one). Ray replaces it by
    the machine's network address, which other nodes can reach, unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 was set
    before Ray was imported (Ray's setting for clusters that stay on one machine, read once into
    ``ray_constants.ENABLE_RAY_CLUSTER``). Used for a cluster of the job's own, a driver joining a cluster on
    127.0.0.1, and the nodes of ``asyppo local-cluster``; everything else is left as it was."""
    from ray._private import ray_constants

    previous, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = previous
