"""What a user brings (docs/rewards.md): a reward function in a file of their own, a dataset with columns of its own,
a chat-templated tokenizer; and what they get back: generations they can read (samples.jsonl, a W&B table), actor
output in the run's log files. A real job on a local Ray cluster with real vLLM, DeepSpeed and W&B (offline)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import ray

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


def test_own_reward_chat_template_samples_and_log_files(user_job, tmp_path, monkeypatch):
    calls = tmp_path / "reward-calls.txt"
    monkeypatch.setenv("REWARD_CALLS", str(calls))  # the local cluster's workers inherit the driver's environment
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
    trainer = Trainer(cfg)
    try:
        # The driver ran the function once per split on a sample row before any actor started.
        assert calls.read_text().split() == [str(os.getpid())] * 2
        rollouts = [trainer.step(step).rollout for step in range(2)]
        outputs = [output for rollout in rollouts for output in rollout.outputs]
        worker_pid = ray.get(trainer.actors.rollout_workers[0].pid.remote())
    finally:
        trainer.close()

    # Every response was scored in the rollout worker by the user's function, with the row's own column.
    pids = calls.read_text().split()[2:]
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
