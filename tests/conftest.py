"""Shared fixtures: tiny random Qwen2 models saved as ordinary Hugging Face directories, and the uninterrupted
reference run that the fault tests compare against."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_SILENT", "true")


def save_tiny_qwen2(path, *, hidden=32, layers=2, vocab=24, seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=True,
    )
    Qwen2ForCausalLM(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_policy_dir(tmp_path_factory):
    return save_tiny_qwen2(tmp_path_factory.mktemp("policy") / "policy", hidden=32, seed=1)


@pytest.fixture(scope="session")
def tiny_critic_dir(tmp_path_factory):
    return save_tiny_qwen2(tmp_path_factory.mktemp("critic") / "critic", hidden=16, seed=2)


@pytest.fixture(scope="module")
def shared_ray():
    """One local Ray cluster for a module's jobs, which join it (``connect_ray`` finds Ray initialised) instead of
    each starting and stopping its own: for tests that kill no process outside their own job's actors. Sized like
    the embedded cluster of a small job; a bigger one is scaled to fit (``fit_to_cluster``)."""
    import ray

    ray.init(address="local", num_cpus=max(6, os.cpu_count() or 1), object_store_memory=512 * 1024**2,
             log_to_driver=False, configure_logging=False)  # with the dashboard: its state API lists the actors
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
    """The small job of ``tests/reference_run.py`` run once without faults: (summary, run directory)."""
    from asyppo.common.config import build_config
    from asyppo.cluster.driver import train
    from tests.reference_run import JOB

    root = tmp_path_factory.mktemp("reference")
    summary = train(build_config(overrides=[*JOB, f"trainer.run_dir={root}", "trainer.name=reference"]))
    return summary, root / "reference"
