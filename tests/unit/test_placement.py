"""Where a job's actors go: node types per role, fitting a running cluster, and the local multi-node cluster's input
(docs/scaling.md). The placement itself, on real nodes, is tested in tests/cluster/test_multinode.py."""

from __future__ import annotations

import pytest

from asyppo.cluster.actor_group import NODE_TYPE_SHARE, fit_to_cluster, role_resources
from asyppo.cluster.local_cluster import parse_nodes
from asyppo.common.config import build_config, resume_changes
from asyppo.common.network import is_loopback_address

TYPED = ["rollout.node_type=rollout_node", "critics.node_type=train_node", "learner.node_type=train_node"]


def test_a_role_with_a_node_type_asks_a_sliver_of_that_resource_in_every_bundle():
    roles = role_resources(build_config(overrides=[*TYPED, "rollout.num_workers=3", "rollout.gpus_per_worker=2"]))
    assert roles["rollout"].bundle() == {"CPU": 1.0, "GPU": 2, "rollout_node": NODE_TYPE_SHARE}
    assert roles["critics"].bundle() == {"CPU": 0.5, "train_node": NODE_TYPE_SHARE}
    assert role_resources(build_config())["learner"].bundle() == {"CPU": 1.0}  # no type: any node


def test_a_node_type_no_node_carries_yet_is_said_and_waited_for():
    """An autoscaler adds nodes of a type once a placement asks for them, so a type missing now is no error."""
    cfg = build_config(overrides=TYPED)
    said = []
    fitted = fit_to_cluster(cfg, {"CPU": 8.0, "train_node": 1.0}, said.append)
    assert fitted == cfg
    assert said == ["rollout.node_type: no node of the cluster carries the resource 'rollout_node' now; the rollout "
                    "role waits for one to join (an autoscaler's)"]


def test_node_types_and_node_waits_may_change_on_resume():
    before = build_config(overrides=TYPED)
    after = build_config(overrides=["rollout.node_type=cpu_node", "trainer.node_wait_s=30"])
    assert resume_changes(before, after) == []


@pytest.mark.parametrize("text, nodes", [
    ("rollout_node=2,train_node=1", {"rollout_node": 2, "train_node": 1}),
    ("gpu , gpu=2", {"gpu": 3}),
])
def test_local_cluster_nodes_parse(text, nodes):
    assert parse_nodes(text) == nodes


@pytest.mark.parametrize("text", ["", "rollout_node=two", "=2", "x=-1"])
def test_local_cluster_nodes_refuse_what_is_not_type_equals_count(text):
    with pytest.raises(ValueError, match="--nodes"):
        parse_nodes(text)


@pytest.mark.parametrize("address, loopback", [
    ("127.0.0.1:6379", True), ("localhost:6379", True), ("[::1]:6379", True), ("ray://127.0.0.1:10001", True),
    ("10.0.0.5:6379", False), ("head.svc:6379", False), ("auto", False),
])
def test_a_ray_address_on_this_machines_loopback_is_recognised(address, loopback):
    assert is_loopback_address(address) is loopback


class RolloutWaitingForANode:
    """The rollout role as ActorGroup reports it after its node was lost with no other of its type having room:
    the placement group reschedules, and rollout-0's bundle has no node (tests/cluster/test_multinode.py causes this
    on real nodes; the wait's end by timeout is checked here, without waiting out a real one)."""

    role = "rollout"
    resources = role_resources(build_config(overrides=TYPED))["rollout"]

    def __init__(self):
        self.lost = True

    def needs_node(self) -> list[str]:
        return ["rollout-0"] if self.lost else []


def test_a_role_waits_for_a_node_up_to_node_wait_s_then_the_job_stops_naming_what_it_needs(tmp_path, caplog):
    import logging

    from asyppo.cluster.checkpoint import CheckpointDir
    from asyppo.cluster.errors import JobFailed
    from asyppo.cluster.supervisor import Supervisor

    caplog.set_level(logging.WARNING, logger="asyppo")
    supervisor = Supervisor(build_config(overrides=[*TYPED, "trainer.node_wait_s=30"]), tmp_path,
                            CheckpointDir(tmp_path, keep=1), None)
    supervisor.rollout_workers = group = RolloutWaitingForANode()
    needs = "the rollout role needs CPU 1, GPU 0 on a node of type 'rollout_node' for rollout-0"
    assert supervisor.waiting_for_node()
    assert caplog.messages == [f"a node was lost and no other has room ({needs}): waiting up to "
                               "trainer.node_wait_s=30s for a node to join"]
    group.lost = False
    assert not supervisor.waiting_for_node()
    assert caplog.messages[-1].startswith("a node with room joined after ")

    group.lost = True
    assert supervisor.waiting_for_node()
    supervisor._node_wait_started -= 31  # the wait began 31 s ago
    with pytest.raises(JobFailed) as failure:
        supervisor.waiting_for_node()
    assert str(failure.value) == (f"a node was lost and none with room joined within trainer.node_wait_s=30s ({needs}): "
                                  "add such a node and start the run again")
