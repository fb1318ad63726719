"""Several Ray nodes on one machine: a real multi-node cluster to try jobs on and to test them (docs/scaling.md).

Every node is a raylet of its own with its own logical CPUs, started the way Ray's multi-node tests start them
(``ray.cluster_utils.Cluster``). A node of type ``T`` carries the custom resource ``{T: 1}``, which is what a role's
``node_type`` asks for (``rollout.node_type: rollout_node``). The head carries no CPUs, so that every actor lands on
a typed node, and serves the Ray dashboard.

Everything stays on 127.0.0.1: each node is given that address and keeps it
(``asyppo.common.network.keep_loopback_node_address``), as does a driver that joins the cluster through a loopback
``RAY_ADDRESS`` (``asyppo.cluster.supervisor.connect_ray``).

    asyppo local-cluster --nodes rollout_node=2,train_node=1     # then type `add rollout_node`, `remove ...`
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from asyppo.common.network import LOOPBACK, free_port, keep_loopback_node_address

# Ray's control store declares a node dead after this many missed health checks of this period: ~5 s instead of
# Ray's defaults (~30 s, for networks with lag), since every node here is on the same machine.
FAST_NODE_FAILURE_DETECTION = {"health_check_period_ms": 1000, "health_check_failure_threshold": 5}
DASHBOARD_PORT = 8265  # Ray's default, which `ray job submit` and `asyppo submit` try first


@dataclass
class LocalNode:
    name: str  # e.g. rollout_node-2: the type, and how many of that type joined before it
    node_type: str
    node_id: str  # Ray's node id (hex), as the dashboard and ray.nodes() show it
    raylet: object  # ray._private.node.Node


class LocalCluster:
    """A head without CPUs plus typed worker nodes, all on 127.0.0.1; nodes join and leave with :meth:`add` and
    :meth:`remove`. ``shutdown`` stops every node."""

    def __init__(self, nodes: dict[str, int], *, cpus_per_node: float = 2, object_store_mib: int = 256,
                 dashboard: bool = True):
        from ray.cluster_utils import Cluster

        self.cpus_per_node = cpus_per_node
        self.object_store_mib = object_store_mib
        self.nodes: list[LocalNode] = []
        self._joined: Counter[str] = Counter()  # node type → nodes of it started so far
        with keep_loopback_node_address():
            self._cluster = Cluster(initialize_head=True, head_node_args=dict(
                num_cpus=0, node_ip_address=LOOPBACK, include_dashboard=dashboard, dashboard_host=LOOPBACK,
                dashboard_port=_port_or_free(DASHBOARD_PORT), object_store_memory=object_store_mib * 1024**2,
                _system_config=FAST_NODE_FAILURE_DETECTION,
            ))
        try:
            for node_type, count in nodes.items():
                for _ in range(count):
                    self.add(node_type)
        except BaseException:
            self.shutdown()
            raise

    @property
    def address(self) -> str:
        """The GCS address a driver joins with (``RAY_ADDRESS``)."""
        return self._cluster.address

    @property
    def dashboard_url(self) -> str | None:
        url = self._cluster.webui_url
        return f"http://{url}" if url else None

    def add(self, node_type: str) -> LocalNode:
        """A new node of ``node_type``; returns once Ray lists it alive."""
        with keep_loopback_node_address():
            raylet = self._cluster.add_node(
                num_cpus=self.cpus_per_node, resources={node_type: 1}, node_ip_address=LOOPBACK,
                object_store_memory=self.object_store_mib * 1024**2,
            )
        node = LocalNode(f"{node_type}-{self._joined[node_type]}", node_type, raylet.node_id, raylet)
        self._joined[node_type] += 1
        self.nodes.append(node)
        return node

    def remove(self, node: LocalNode | str) -> LocalNode:
        """Kill one node's raylet and every process on it, as a lost host would lose them. ``node``: a node, its
        name, or a node type (its newest node)."""
        if isinstance(node, str):
            matches = [n for n in self.nodes if node in (n.name, n.node_type)]
            if not matches:
                raise ValueError(f"no node named or typed {node!r}; nodes: {', '.join(self.names()) or 'none'}")
            node = matches[-1]
        self._cluster.remove_node(node.raylet, allow_graceful=False)
        self.nodes.remove(node)
        return node

    def names(self) -> list[str]:
        return [node.name for node in self.nodes]

    def describe(self) -> list[str]:
        """Each worker node as Ray's control store (GCS) sees it: ``rollout_node-0 (alive, 2 CPUs)``."""
        table = {entry["NodeID"]: entry for entry in self._cluster.global_state.node_table()}
        lines = []
        for node in self.nodes:
            entry = table.get(node.node_id, {})
            state = "alive" if entry.get("Alive") else "not alive"
            lines.append(f"{node.name} ({state}, {entry.get('Resources', {}).get('CPU', 0):g} CPUs)")
        return lines

    def placement_groups(self) -> list[tuple[str, str]]:
        """Every placement group's name and state (PENDING, CREATED, RESCHEDULING, REMOVED) as Ray's control store
        sees it, removed ones included."""
        return [(entry["name"], entry["state"]) for entry in self._cluster.global_state.placement_group_table().values()]

    def shutdown(self) -> None:
        self._cluster.shutdown()
        self.nodes = []


def _port_or_free(port: int) -> int:
    """``port`` if it is free on 127.0.0.1 (another Ray instance may serve its dashboard there), else a free one."""
    import socket

    with socket.socket() as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return free_port(LOOPBACK)
    return port


def parse_nodes(text: str) -> dict[str, int]:
    """``"rollout_node=2,train_node=1"`` → ``{"rollout_node": 2, "train_node": 1}`` (a bare type counts 1)."""
    nodes: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        node_type, _, count = item.partition("=")
        try:
            number = int(count) if count else 1
        except ValueError:
            number = -1
        if not node_type or number < 0:
            raise ValueError(f"--nodes: {item!r} is not TYPE=COUNT (e.g. rollout_node=2)")
        nodes[node_type] = nodes.get(node_type, 0) + number
    if not nodes:
        raise ValueError("--nodes: name at least one node type, e.g. rollout_node=1,train_node=1")
    return nodes
