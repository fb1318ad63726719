"""What a user brings (docs/rewards.md): a reward function in a file of their own, a dataset with columns of its own,
a chat-templated tokenizer, a machine where `ray start` once ran; and what they get back: generations they can read
(samples.jsonl, a W&B table), actor output in the run's log files, a cluster of the job's own that listens on
127.0.0.1 only (docs/deploy.md). One real job on a local Ray cluster with real vLLM, DeepSpeed and W&B (offline)."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import ray
from ray._private.utils import get_ray_address_file, read_ray_address

from asyppo.common.config import build_config
from asyppo.cluster.driver import Trainer
from asyppo.cluster.job_inputs import resolve_models
from asyppo.cluster.metrics import read_metrics
from asyppo.tasks.arithmetic import arithmetic_problems

pytestmark = pytest.mark.cluster

# A template that the tiny tokenizer (digits, + - * =, space) can spell: the system prompt, a space, the prompt.
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'system' %} {% endif %}{% endfor %}"
SYSTEM_PROMPT = "0+0=0"

REWARD_FILE = '''
import os

def weighted(prompt, response, answer, row):
    """Scores row["weight"] when right and -0.5 when wrong; notes which process scored what."""
    with open(os.environ["REWARD_CALLS"], "a") as calls:
        calls.write(f"{os.getpid()}\\n")
    right = response.strip() == answer
    return (row["weight"] if right else -0.5), right
'''


@pytest.fixture(scope="module")
def user_job(tmp_path_factory):
    """The built-in task's models with a chat template added to the policy's tokenizer, its problems as a JSON Lines
    file with a column of the user's own, and a reward function in a file outside the package."""
    root = tmp_path_factory.mktemp("user")
    models = resolve_models(build_config())
    shutil.copytree(models.policy, root / "policy")
    shutil.copytree(models.critic, root / "critic")
    config_path = root / "policy" / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config["chat_template"] = CHAT_TEMPLATE
    config_path.write_text(json.dumps(tokenizer_config))
    for split, count in (("train", 64), ("eval", 16)):
        with (root / f"{split}.jsonl").open("w") as rows:
            for number, problem in enumerate(arithmetic_problems(count, split=split, seed=0)):
                rows.write(json.dumps({"question": problem.prompt, "answer": problem.answer,
                                       "weight": 1.0 + number % 3}) + "\n")
    (root / "my_rewards.py").write_text(REWARD_FILE)
    return root


@dataclass
class UserRun:
    trainer: Trainer
    rows: dict  # question → the training file's row
    rollouts: list
    worker_pid: int
    reward_calls: list[str]  # the process id of each call of the user's reward function, in order
    sockets: list[tuple[str, int, str]]  # what the job's processes listened on during its first step
    ray_address: str


@pytest.fixture(scope="module")
def user_run(user_job, tmp_path_factory) -> UserRun:
    """Two steps of the user's job, on a machine where `ray start` once ran: Ray's address file names a cluster that
    has since died. ray.init() without an address would try to join that cluster (and refuse the job's num_cpus);
    the job starts its own instead, listening on 127.0.0.1 only."""
    tmp_path = tmp_path_factory.mktemp("user-run")
    calls = tmp_path / "reward-calls.txt"
    rows = {row["question"]: row for row in map(json.loads, (user_job / "train.jsonl").read_text().splitlines())}
    cfg = build_config(overrides=[
        f"model.policy={user_job / 'policy'}", f"model.critic={user_job / 'critic'}",
        f"data.train={user_job / 'train.jsonl'}", f"data.eval={user_job / 'eval.jsonl'}",
        "data.chat_template=true", f"data.system_prompt={SYSTEM_PROMPT}",
        f"reward.function={user_job / 'my_rewards.py'}:weighted",
        "rollout.prompts_per_step=8", "rollout.samples_per_prompt=4", "learner.mini_batch_size=16",
        "learner.micro_batch_size=16", "critics.micro_batch_size=32", "data.eval_size=16",
        f"trainer.run_dir={tmp_path}", "trainer.steps=2", "trainer.eval_every=0", "trainer.checkpoint_every=0",
        "trainer.call_timeout_s=180", "weight_sync.timeout_s=60", "logging.wandb_mode=offline",
        "logging.samples_every=1", "logging.samples_per_log=4",
    ])
    address_file = Path(get_ray_address_file(None))
    kept = address_file.read_text() if address_file.exists() else None
    address_file.parent.mkdir(parents=True, exist_ok=True)
    address_file.write_text("127.0.0.1:9")  # a cluster that has died: nothing listens there
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("RAY_ADDRESS", raising=False)
        patch.setenv("REWARD_CALLS", str(calls))  # the local cluster's workers inherit the driver's environment
        try:
            assert read_ray_address() == "127.0.0.1:9"
            trainer = Trainer(cfg)
            try:
                assert trainer.owns_ray
                address = ray.get_runtime_context().gcs_address
                # The driver ran the function once per split on a sample row before any actor started.
                assert calls.read_text().split() == [str(os.getpid())] * 2
                rollouts = [trainer.step(0).rollout]  # every process group formed and used
                sockets = listening_sockets()
                rollouts.append(trainer.step(1).rollout)
                worker_pid = ray.get(trainer.actors.rollout_workers[0].pid.remote())
            finally:
                trainer.close()
        finally:
            if kept is None:
                address_file.unlink(missing_ok=True)
            else:
                address_file.write_text(kept)
    return UserRun(trainer, rows, rollouts, worker_pid, calls.read_text().split(), sockets, address)


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


def test_a_job_beside_a_stale_ray_address_file_starts_its_own_cluster_on_loopback_only(user_run):
    """Nothing the job starts (Ray's servers, its actors, the learner's and the weight broadcast's process groups)
    listens on another address than 127.0.0.1: a job on one machine opens no port to the network."""
    assert user_run.ray_address != "127.0.0.1:9"
    names = {name for _, _, name in user_run.sockets}
    assert {"gcs_server", "raylet"} <= names and any("Learner" in name for name in names), names
    assert [entry for entry in user_run.sockets if not is_loopback(entry[0])] == []


def test_own_reward_chat_template_samples_and_log_files(user_run):
    trainer, rows, rollouts, worker_pid = user_run.trainer, user_run.rows, user_run.rollouts, user_run.worker_pid
    outputs = [output for rollout in rollouts for output in rollout.outputs]

    # Every response was scored in the rollout worker by the user's function, with the row's own column.
    pids = user_run.reward_calls[2:]
    assert pids == [str(worker_pid)] * (2 * 8 * 4)
    for output, problems in zip(outputs, [rollout.problems for rollout in rollouts]):
        for index, text in enumerate(output["response_text"]):
            row = rows[problems[index // 4].prompt]
            right = text.strip() == row["answer"]
            assert output["scores"][index].item() == (row["weight"] if right else -0.5)
            assert bool(output["correct"][index]) == right
        # The policy saw each prompt in the chat template, after the system prompt: the ids the learner and the
        # critics train on are the ones the rollout worker returns.
        for problem, ids in zip(problems, output["prompt_ids"]):
            assert ids == trainer.tokenizer(f"{SYSTEM_PROMPT} {problem.prompt}")["input_ids"]

    # Generations to read: 4 per step, with their reward, verdict and the critics' mean σ.
    run = trainer.run_path
    samples = read_metrics(run / "samples.jsonl")
    assert [record["step"] for record in samples] == [0] * 4 + [1] * 4
    for record in samples:
        row = rows[record["prompt"]]
        assert record["reference"] == row["answer"]
        assert record["correct"] == (record["response"].strip() == row["answer"])
        assert record["reward"] == (row["weight"] if record["correct"] else -0.5)
        assert record["sigma_mean"] is not None and record["sigma_mean"] >= 0
    # Step 0: the critics' heads start at zero, so they agree exactly; by step 1 they have trained apart.
    assert all(record["sigma_mean"] == 0 for record in samples[:4])
    assert any(record["sigma_mean"] > 0 for record in samples[4:])
    # The same records as a W&B table in the offline run.
    (offline,) = (run / "wandb").glob("offline-run-*")
    # (W&B names both files samples_0_<content hash>: which is which is told by their rows, not their names.)
    tables = [json.loads(path.read_text())
              for path in (offline / "files" / "media" / "table").glob("samples_*.table.json")]
    assert len(tables) == 2
    assert all(table["columns"][:4] == ["step", "id", "prompt", "response"] for table in tables)
    assert sorted([row[0], row[2]] for table in tables for row in table["data"]) == sorted(
        [record["step"], record["prompt"]] for record in samples)

    # The actors' own output (vLLM, DeepSpeed, transformers) is in the run's log files, not on the console.
    logs = run / "logs"
    assert {"driver.log", "rollout-0.log", "learner.log", "critic-0.log", "critic-1.log"} <= {
        path.name for path in logs.iterdir()}
    assert "vllm" in (logs / "rollout-0.log").read_text().lower()
