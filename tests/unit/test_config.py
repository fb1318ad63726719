"""Job configuration: presets (docs/algorithms.md §6), YAML + dotted overrides, and errors that name the field."""

import json
import logging
from pathlib import Path

import pytest
import yaml

from asyppo.common.config import RENAMED, PRESETS, ConfigError, JobConfig, build_config, load_config, parse_overrides
from asyppo.tasks.registry import TASKS


def problems_of(overrides, raw=None):
    with pytest.raises(ConfigError) as info:
        build_config(raw, overrides)
    return info.value.problems, str(info.value)


def test_default_is_the_asyppo_preset_of_the_spec_table():
    cfg = build_config()
    alg = cfg.algorithm
    assert cfg.preset == "asyppo"
    assert (alg.estimator, cfg.critics.num_critics, alg.clip_mode) == ("asyppo", 2, "ppo")
    assert (alg.clip_low, alg.clip_high, alg.dual_clip) == (0.2, 0.28, 3.0)
    assert alg.erc_band == (0.95, 1.05)
    assert alg.entropy_coef == 1e-3
    assert (alg.adv_mask_fraction, alg.entropy_filter_fraction) == (0.2, 0.2)
    assert (alg.gamma, alg.lam) == (1.0, 1.0)
    assert alg.value_clip == 0.5 and alg.critic_split == "prompt"


# The §6 table, typed in here independently of asyppo.common.config.PRESETS.
SPEC_TABLE = {
    "asyppo": ("asyppo", 2, "ppo", 0.2, 0.28, 3.0, (0.95, 1.05), 1e-3, 0.2, 0.2),
    "asyppo-only": ("asyppo", 2, "ppo", 0.2, 0.2, None, None, 1e-3, 0.2, 0.2),
    "ppo": ("gae", 1, "ppo", 0.2, 0.2, 3.0, None, 1e-3, 0.0, 0.0),
    "ppo-policy-critic": ("gae", 1, "ppo", 0.2, 0.2, 3.0, None, 1e-3, 0.0, 0.0),
    "grpo": ("grpo", 0, "ppo", 0.2, 0.2, 3.0, None, 0.0, 0.0, 0.0),
    "dapo-erc": ("grpo", 0, "ppo", 0.2, 0.28, 10.0, (0.95, 1.05), 0.0, 0.0, 0.0),
    "gppo-erc": ("grpo", 0, "gppo", 0.2, 0.2, 10.0, (0.95, 1.05), 0.0, 0.0, 0.0),
}


@pytest.mark.parametrize("name", sorted(SPEC_TABLE))
def test_presets_match_the_spec_table(name):
    cfg = build_config(overrides=[f"preset={name}"])
    alg = cfg.algorithm
    got = (alg.estimator, cfg.critics.num_critics, alg.clip_mode, alg.clip_low, alg.clip_high, alg.dual_clip,
           alg.erc_band, alg.entropy_coef, alg.adv_mask_fraction, alg.entropy_filter_fraction)
    assert got == SPEC_TABLE[name]
    assert set(PRESETS) == set(SPEC_TABLE)
    # DAPO's dynamic sampling comes with the DAPO preset only.
    assert cfg.rollout.dynamic_sampling == (name == "dapo-erc")
    # Only the papers' PPO baseline changes the critics' model: to the policy's own.
    assert cfg.model.critic == ("policy" if name == "ppo-policy-critic" else "builtin:tiny-critic")


# What a preset may set: the algorithm switches and the critics they need (docs/algorithms.md §6).
PRESET_SWITCHES = {
    *(f"algorithm.{name}" for name in ("estimator", "clip_mode", "clip_low", "clip_high", "dual_clip", "erc_band",
                                       "entropy_coef", "adv_mask_fraction", "entropy_filter_fraction")),
    "critics.num_critics", "model.critic", "rollout.dynamic_sampling",
}


def flat(tree, prefix=""):
    return {path: value for key, sub in tree.items()
            for path, value in (flat(sub, f"{prefix}{key}.").items() if isinstance(sub, dict)
                                else [(f"{prefix}{key}", sub)])}


@pytest.mark.parametrize("name", sorted(SPEC_TABLE))
def test_presets_are_written_as_differences_from_the_defaults(name):
    """Each preset lists only what it changes from the defaults (AsyPPO's), and its config differs from the default
    config in exactly those fields: with test_presets_match_the_spec_table this pins every preset's whole config."""
    defaults = flat(JobConfig().model_dump(mode="json"))
    written = flat(json.loads(json.dumps(PRESETS[name])))  # tuples and lists alike, as in the JSON dump
    assert set(written) <= PRESET_SWITCHES
    redundant = [path for path, value in written.items() if defaults[path] == value]
    assert not redundant, f"preset {name} repeats the defaults of {redundant}"
    built = flat(build_config(overrides=[f"preset={name}"]).model_dump(mode="json"))
    assert {path for path in defaults if built[path] != defaults[path]} - {"preset"} == set(written)


def test_every_switch_stays_independently_configurable():
    cfg = build_config(overrides=["algorithm.clip_mode=gppo", "algorithm.erc_band=[0.9, 1.1]", "critics.num_critics=3"])
    assert cfg.algorithm.estimator == "asyppo" and cfg.algorithm.clip_mode == "gppo"
    # The band reaches the loss as the bounds the user wrote.
    assert cfg.algorithm.erc_band == (0.9, 1.1) and cfg.critics.num_critics == 3
    assert build_config(overrides=["preset=ppo"]).algorithm.erc_band is None


def test_yaml_file_then_overrides_win(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"preset": "grpo", "rollout": {"num_workers": 2, "samples_per_prompt": 4},
                                    "learner": {"lr": 1e-5}}))
    cfg = load_config(path, ["learner.lr=3e-6", "trainer.steps=5"])
    assert cfg.preset == "grpo" and cfg.critics.num_critics == 0
    assert cfg.rollout.num_workers == 2 and cfg.learner.lr == 3e-6 and cfg.trainer.steps == 5
    # The resolved config round-trips through YAML (what the run directory stores).
    assert JobConfig.model_validate(yaml.safe_load(cfg.to_yaml())) == cfg


def test_override_values_are_parsed_as_yaml():
    assert parse_overrides(["a.b=3", "a.c=0.5", "d=null", "e=[1, 2]", "f=true", "g=text"]) == {
        "a": {"b": 3, "c": 0.5}, "d": None, "e": [1, 2], "f": True, "g": "text"}


@pytest.mark.parametrize("overrides, path, fragment", [
    (["critics.num_critics=1"], "critics.num_critics", "k>0 needs at least 2 critics"),
    (["rollout.num_workers=0"], "rollout.num_workers", "must be a number ≥ 1, or a range [min, max]"),
    (["rollout.num_workers=[3, 1]"], "rollout.num_workers", "with 1 ≤ min ≤ max"),
    (["trainer.seed=-1"], "trainer.seed", "greater than or equal to 0"),
    (["trainer.seed=4294967296"], "trainer.seed", "less than 4294967296"),
    (["algorithm.erc_band=[1.0, 1.05]"], "algorithm.erc_band", "low < 1 < high"),
    (["algorithm.erc_band=[0.9, 0.99]"], "algorithm.erc_band", "low < 1 < high"),
    (["algorithm.erc_band=[0.95]"], "algorithm.erc_band.1", "Field required"),
    (["algorithm.clip_mode=fancy"], "algorithm.clip_mode", "'ppo' or 'gppo'"),
    (["algorithm.dual_clip=0.5"], "algorithm.dual_clip", "greater than 1"),
    (["algorithm.clip_low=1.2"], "algorithm.clip_low", "less than 1"),
    (["data.task=poetry"], "data.task", "'arithmetic', 'chain', 'math' or 'words'"),
    (["learner.lernrate=1"], "learner.lernrate", "unknown field"),
    (["preset=grpo", "critics.num_critics=2"], "critics.num_critics", "grpo uses no critics"),
    (["preset=ppo", "critics.num_critics=2"], "critics.num_critics", "exactly 1 critic"),
    (["preset=grpo", "rollout.samples_per_prompt=1", "learner.mini_batch_size=32",
      "learner.micro_batch_size=32"], "rollout.samples_per_prompt", "at least 2 samples"),
    (["algorithm.critic_split=response", "critics.num_critics=3"], "algorithm.critic_split",
     "divisible by num_critics"),
    (["learner.mini_batch_size=100"], "learner.mini_batch_size", "must divide the rollout batch"),
    (["learner.micro_batch_size=48"], "learner.micro_batch_size", "must divide mini_batch_size"),
    (["learner.num_gpus=2", "learner.micro_batch_size=64"], "learner.micro_batch_size", "×2"),
    (["learner.ranks=2", "learner.micro_batch_size=64"], "learner.micro_batch_size", "×2"),
    (["learner.num_gpus=2", "learner.ranks=3", "learner.micro_batch_size=8"], "learner.ranks", "one rank per GPU"),
    (["critics.gpus_per_critic=1.5"], "critics.gpus_per_critic", "whole number"),
    (["weight_sync.backend=nccl"], "weight_sync.backend", "nccl needs GPUs"),
    (["rollout.top_p=0.9"], "rollout.top_p", "renormalised over the nucleus"),
    (["algorithm.off_policy_cap=1.0"], "algorithm.off_policy_cap", "greater than 1"),
    (["algorithm.off_policy_correction=clip"], "algorithm.off_policy_correction", "'token-truncate'"),
    (["trainer.name=../elsewhere"], "trainer.name", "must be a plain name"),
    (["trainer.name=a/b"], "trainer.name", "not a path"),
    (["preset=grpo", "algorithm.critic_warmup_steps=3"], "algorithm.critic_warmup_steps", "there are none"),
    (["trainer.steps=5", "algorithm.critic_warmup_steps=5"], "algorithm.critic_warmup_steps", "never be updated"),
    (["trainer.steps=10", "algorithm.critic_warmup_steps=5", "learner.lr_warmup_steps=5"], "learner.lr_warmup_steps",
     "5 >= the 5 steps it updates in"),
    (["data.task=chain"], "data.train", "use builtin:chain or a file"),
    (["data.task=math", "data.train=/data/train.jsonl"], "data.eval", "the task has no built-in data"),
    (["preset=dapo-erc", "trainer.max_staleness=1"], "rollout.dynamic_sampling", "needs trainer.max_staleness=0"),
    (["rollout.dynamic_sampling=true", "rollout.samples_per_prompt=1", "learner.mini_batch_size=32",
      "learner.micro_batch_size=32", "algorithm.adv_mask_fraction=0"], "rollout.dynamic_sampling", "at least 2 samples"),
    (["preset=nope"], "preset", "unknown preset"),
    (["novalue"], "novalue", "dotted.key=value"),
])
def test_bad_values_report_field_path_and_reason(overrides, path, fragment):
    problems, message = problems_of(overrides)
    matching = [reason for field, reason in problems if field == path]
    assert matching, f"no problem reported at {path}: {problems}"
    assert any(fragment in reason for reason in matching), matching
    assert f"{path}: " in message


def test_top_p_below_one_is_allowed_without_off_policy_correction():
    cfg = build_config(overrides=["rollout.top_p=0.9", "algorithm.off_policy_correction=none"])
    assert cfg.rollout.top_p == 0.9
    assert build_config().algorithm.off_policy_correction == "token-truncate"  # on by default


def test_weight_check_tolerance_defaults_per_dtype_and_can_be_set():
    assert build_config().weight_sync.check_tolerance == 1e-3
    gpu = ["rollout.gpus_per_worker=1", "learner.num_gpus=1", "learner.micro_batch_size=64"]
    assert build_config(overrides=[*gpu, "model.dtype=bfloat16"]).weight_sync.check_tolerance == 5e-2
    assert build_config(overrides=[*gpu, "model.dtype=bfloat16",
                                   "weight_sync.check_tolerance=0.02"]).weight_sync.check_tolerance == 0.02


def test_all_problems_are_reported_at_once():
    problems, _ = problems_of(["rollout.num_workers=0", "learner.lr=-1"])
    assert {field for field, _ in problems} == {"rollout.num_workers", "learner.lr"}


def test_bad_config_files(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("learner: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)


def test_task_names_come_from_the_registry(monkeypatch):
    assert set(JobConfig.model_fields["data"].annotation.model_fields["task"].annotation.__args__) == set(TASKS)


@pytest.mark.parametrize("old, new", sorted(RENAMED.items()))
def test_old_names_still_read_with_a_warning(old, new, caplog):
    value = {"estimator": "gae", "erc_band": [0.9, 1.1], "clip_mode": "gppo", "agg": "seq-mean-token-mean",
             "ensemble": "min", "split": "response", "sync_backend": "gloo", "dual_clip": 2.0}.get(old.split(".")[1], 0.5)
    extra = ["critics.num_critics=1", "algorithm.adv_mask_fraction=0", "algorithm.entropy_filter_fraction=0"] \
        if value == "gae" else []
    with caplog.at_level(logging.WARNING, logger="asyppo"):
        cfg = build_config(overrides=[f"{old}={yaml.safe_dump(value, default_flow_style=True).strip()}", *extra])
    section, name = new.split(".")
    got = getattr(getattr(cfg, section), name)
    assert (list(got) if isinstance(got, tuple) else got) == value
    assert any(old in record.message and new in record.message for record in caplog.records)


def test_old_and_new_name_together_is_an_error(tmp_path):
    problems, _ = problems_of(["learner.clip_low=0.1", "algorithm.clip_low=0.3"])
    assert problems == [("learner.clip_low", "renamed to algorithm.clip_low, which is also set; keep only "
                                             "algorithm.clip_low")]
    # An old name in the YAML file and the new one on the command line: the command line wins, as always.
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({"learner": {"clip_low": 0.1}, "critics": {"split": "response"}}))
    cfg = load_config(path, ["algorithm.clip_low=0.3"])
    assert cfg.algorithm.clip_low == 0.3 and cfg.algorithm.critic_split == "response"


@pytest.mark.parametrize("example", sorted((Path(__file__).resolve().parents[2] / "examples").glob("**/*.yaml")),
                         ids=lambda path: path.name)
def test_every_example_config_is_valid(example):
    load_config(example)  # raises ConfigError naming the field
