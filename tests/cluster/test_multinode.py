"""Several Ray nodes on this machine (asyppo.cluster.local_cluster: real raylets, each with its own CPUs and node
type): roles placed by node type, nodes lost and added mid-run (docs/scaling.md).

The driver runs as its own process (`asyppo train` with RAY_ADDRESS), as a user's would; nodes are removed by
killing their raylet and every process on it, as a lost host loses them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from asyppo.cluster.checkpoint import verify
from asyppo.cluster.local_cluster import LocalCluster
from tests.reference_run import JOB, assert_same_run

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster():
    local = LocalCluster({"rollout_node": 1, "train_node": 1}, cpus_per_node=2, dashboard=False)
    yield local
    local.shutdown()


def start_job(cluster: LocalCluster, run_dir: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    log = (run_dir / f"driver-{len(list(run_dir.glob('driver-*')))}.out").open("w")
    return subprocess.Popen([sys.executable, "-m", "asyppo.cluster.cli", "train", *args], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT, text=True)


def wait_until(condition, what: str, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def steps_done(run: Path) -> int:
    """Steps logged so far (whole lines only: the driver may be writing the next)."""
    path = run / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def driver_log(run: Path) -> str:
    path = run / "logs" / "driver.log"
    return path.read_text() if path.exists() else ""


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_range_of_rollout_workers_grows_onto_a_joining_node_and_shrinks_when_it_leaves(cluster, tmp_path,
                                                                                          reference_run):
    """rollout.num_workers=[1, 2], one worker per rollout node (2 CPUs each): the job starts with the one worker
    there is room for; a rollout node joins and a second worker starts on it at a step boundary, with the learner's
    weights; that node is lost and the job goes on with one. Seeds are keyed by prompt, so the samples, and every
    number of the run, equal the one-node reference run's with its single worker. trainer.actor_restarts=0: Ray
    reports the worker dead as its node goes (no restart pending), and the job lets it go all the same."""
    _, reference_dir = reference_run
    run = tmp_path / "elastic"
    job = ["--config", "examples/multinode.yaml", *JOB, f"trainer.run_dir={tmp_path}", "trainer.name=elastic",
           "trainer.steps=6", "rollout.num_workers=[1, 2]", "rollout.cpus_per_worker=2", "trainer.actor_restarts=0",
           "weight_sync.timeout_s=20"]
    driver = start_job(cluster, tmp_path, *job)
    wait_until(lambda: (run / "placement.json").exists() or driver.poll() is not None, "the actors' placement")
    assert set(json.loads((run / "placement.json").read_text())) == {"rollout-0", "learner", "critic-0", "critic-1"}

    joined = cluster.add("rollout_node")
    wait_until(lambda: any(m["rollout_workers"] == 2 for m in metrics(run)) if steps_done(run) else
               driver.poll() is not None, "a step with two rollout workers")
    assert driver.poll() is None, driver_log(run)
    assert json.loads((run / "placement.json").read_text())["rollout-1"]["node"] == joined.node_id
    assert f"rollout-1 joined on node {joined.node_id[:8]}: rollout workers now 2 (rollout.num_workers=[1, 2])" in \
        driver_log(run)

    cluster.remove("rollout_node")  # the newest: the one rollout-1 runs on
    wait_until(lambda: "rollout-1 left with its node: rollout workers now 1 (rollout.num_workers=[1, 2])" in
               driver_log(run) or driver.poll() is not None, "rollout-1 let go")
    # Its slot asks for room with a new placement group: none is left RESCHEDULING, which Ray retries without
    # backing off, keeping the control store busy (ray#65007).
    groups = cluster.placement_groups()
    assert ("asyppo-rollout-1", "PENDING") in groups and all(state != "RESCHEDULING" for _, state in groups), groups
    assert driver.wait(timeout=300) == 0, driver_log(run)
    workers = [m["rollout_workers"] for m in metrics(run)]
    assert workers[-1] == 1 and 2 in workers, workers
    assert_same_run(reference_dir, run, steps=4)


def test_roles_follow_node_types_and_the_run_survives_losing_and_regaining_its_nodes(cluster, tmp_path, reference_run):
    """The reference job with its rollout worker on `rollout_node` nodes, the learner on a `train_node` and its two
    critics each alone on a `critic_node` (critics.quorum=1):

    1. before the first step the rollout node is lost with no other of its type: the job waits (trainer.node_wait_s)
       until a new one joins, and the worker Ray restarts there generates as the lost one would have;
    2. after step 1's checkpoint critic-1's node is lost with no other of its type: the job goes on with critic-0
       alone (one critic, no σ: the masks step aside), a checkpoint written meanwhile carries critic-1's state of step
       1 over byte for byte, and once a critic node joins, critic-1 starts there from the latest checkpoint and takes
       part again;
    3. then the train node is lost, and the learner with it: one line with the resume command, every checkpoint whole.

    The steps before critic-1's loss equal the one-node reference run's. The job would run 100 steps: losing the
    learner ends it. (A resume on another cluster is the resume tests' subject: tests/unit/test_resume.py,
    test_actor_faults.py.)"""
    _, reference_dir = reference_run
    run = tmp_path / "multinode"
    critic_nodes = [cluster.add("critic_node"), cluster.add("critic_node")]
    job = ["--config", "examples/multinode.yaml", *JOB, f"trainer.run_dir={tmp_path}", "trainer.name=multinode",
           "trainer.steps=100", "trainer.keep_checkpoints=100", "rollout.num_workers=1",
           "critics.node_type=critic_node", "critics.cpus_per_critic=2", "trainer.node_wait_s=300",
           "trainer.actor_restarts=2", "weight_sync.timeout_s=20"]
    driver = start_job(cluster, tmp_path, *job)
    try:
        # Placed, before the first evaluation: where every actor runs.
        wait_until(lambda: (run / "placement.json").exists() or driver.poll() is not None, "the actors' placement")
        placed = json.loads((run / "placement.json").read_text())
        nodes = {node.node_id: node.node_type for node in cluster.nodes}
        assert {name: nodes[where["node"]] for name, where in placed.items()} == {
            "rollout-0": "rollout_node", "learner": "train_node", "critic-0": "critic_node", "critic-1": "critic_node"}

        # 1. The rollout node, with no other of its type.
        lost_rollout_node = cluster.remove("rollout_node")
        wait_until(lambda: "waiting up to trainer.node_wait_s=300s for a node to join" in driver_log(run),
                   "the driver to notice the lost node")
        assert steps_done(run) == 0  # nothing goes on without the role's node
        new_rollout_node = cluster.add("rollout_node")
        wait_until(lambda: (run / "checkpoints" / "step-1").is_dir() or driver.poll() is not None,
                   "step 1's checkpoint")
        assert driver.poll() is None, driver_log(run)
        log = driver_log(run)
        assert "a node with room joined after" in log
        assert f"node {lost_rollout_node.node_id[:8]} left the cluster (2 CPUs, 0 GPUs, type rollout_node)" in log
        assert f"node {new_rollout_node.node_id[:8]} joined the cluster (2 CPUs, 0 GPUs, type rollout_node)" in log

        # 2. Critic-1's node: the job goes on with critic-0, and critic-1 comes back when a critic node joins.
        lost = next(node for node in critic_nodes
                    if node.node_id == json.loads((run / "placement.json").read_text())["critic-1"]["node"])
        cluster.remove(lost)
        critic_nodes.remove(lost)
        wait_until(lambda: any(m.get("critics_taking_part") == 1 for m in metrics(run)) or driver.poll() is not None,
                   "a step with one critic")
        assert "critic-1 left with its node: critics taking part now 1 of 2 (critics.quorum=1)" in driver_log(run)
        critic_nodes.append(cluster.add("critic_node"))
        wait_until(lambda: "critic-1 resumed from the checkpoint step-" in driver_log(run) or driver.poll() is not None,
                   "critic-1 back")
        wait_until(lambda: metrics(run)[-1]["critics_taking_part"] == 2 or driver.poll() is not None,
                   "a step with both critics again")
        assert driver.poll() is None, driver_log(run)

        # 3. The train node, and the learner with it.
        cluster.remove("train_node")
        assert driver.wait(timeout=240) == 1
    finally:
        for node in critic_nodes:
            cluster.remove(node)
    failure = (tmp_path / "driver-0.out").read_text().strip().splitlines()[-1]
    # The learner's calls fail as its process goes ("learner died"), or the driver sees its node gone first.
    assert failure.startswith("asyppo: ") and ("learner died" in failure or "the learner with it" in failure), failure
    assert failure.endswith(f"resume with: asyppo train --config {run / 'config.yaml'} --resume"), failure

    steps = metrics(run)
    alone = [m for m in steps if m["critics_taking_part"] == 1]
    assert [m["critics_taking_part"] for m in steps[:2]] == [2, 2] and alone, steps
    for m in alone:  # critic-1 neither scored nor trained; one critic gives no σ, so the masks stepped aside
        assert "value_loss_critic_1" not in m and "value_absmax_critic_1" not in m and m["masks_skipped"] == 1
        assert "value_loss_critic_0" in m and m["adv_mask_frac"] == 0
    # What was kept: every checkpoint whole; one written while critic-1 sat out holds its state of step 1.
    manifests = {}
    for checkpoint in sorted((run / "checkpoints").glob("step-*")):
        assert verify(checkpoint) == [], checkpoint
        manifests[checkpoint.name] = json.loads((checkpoint / "manifest.json").read_text())["files"]
    critic_1 = {name: entry["sha256"] for name, entry in manifests["step-1"].items() if name.startswith("critic-1")}
    for m in alone:
        if f"step-{m['step']}" in manifests:
            assert {name: manifests[f"step-{m['step']}"][name]["sha256"] for name in critic_1} == critic_1

    # Until critic-1 went, every step with the one-node reference run's numbers: the worker that Ray restarted on the
    # new rollout node generated exactly what the lost one would have.
    assert_same_run(reference_dir, run, steps=2)
    assert json.loads((run / "placement.json").read_text())["rollout-0"]["node"] == new_rollout_node.node_id


def test_the_local_cluster_command_starts_typed_nodes_and_adds_and_removes_them():
    """`asyppo local-cluster`, as docs/scaling.md tells a person to run it: the nodes it starts are registered alive
    in Ray's control store with their CPUs, and `add` / `remove` on its console change them."""
    commands = "nodes\nadd rollout_node\nnodes\nremove rollout_node-0\nnodes\nremove gpu_node\nquit\n"
    result = subprocess.run([sys.executable, "-m", "asyppo.cluster.cli", "local-cluster", "--nodes", "rollout_node=1",
                             "--cpus-per-node", "1"], input=commands, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == ("Ray cluster on 127.0.0.1: a head without CPUs and 1 worker node(s), 1 CPUs each: "
                        "rollout_node-0 (alive, 1 CPUs)")
    assert [line for line in lines if line.startswith(("rollout_node", "node ", "no node"))] == [
        "rollout_node-0 (alive, 1 CPUs)", "node rollout_node-1 joined",
        "rollout_node-0 (alive, 1 CPUs), rollout_node-1 (alive, 1 CPUs)",
        "node rollout_node-0 removed", "rollout_node-1 (alive, 1 CPUs)",
        "no node named or typed 'gpu_node'; nodes: rollout_node-1"]
    assert lines[-1] == "cluster stopped"
