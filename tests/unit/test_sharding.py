"""Critic shard assignment (docs/algorithms.md §2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyppo.critics.sharding import assign_shards, prompt_shard

prompt_id_lists = st.lists(st.text(min_size=0, max_size=12), min_size=0, max_size=12)


def check_partition(shards, num_rows, num_critics):
    assert len(shards) == num_critics
    flat = [row for shard in shards for row in shard]
    assert sorted(flat) == list(range(num_rows)), "shards must be disjoint and cover every row"
    assert all(shard == sorted(shard) for shard in shards)


@settings(max_examples=150, deadline=None)
@given(prompt_id_lists, st.integers(1, 6), st.integers(1, 5))
def test_prompt_split_partitions_rows_by_prompt(prompt_ids, group_size, num_critics):
    shards = assign_shards(prompt_ids, group_size, num_critics, "prompt")
    check_partition(shards, len(prompt_ids) * group_size, num_critics)
    for prompt_index, prompt_id in enumerate(prompt_ids):
        owner = prompt_shard(prompt_id, num_critics)
        rows = set(range(prompt_index * group_size, (prompt_index + 1) * group_size))
        assert rows <= set(shards[owner])
    assert assign_shards(prompt_ids, group_size, num_critics, "prompt") == shards


@settings(max_examples=150, deadline=None)
@given(prompt_id_lists, st.integers(1, 4), st.integers(1, 4), st.integers(0, 3))
def test_response_split_is_balanced_per_prompt(prompt_ids, parts_per_critic, num_critics, seed):
    group_size = parts_per_critic * num_critics
    shards = assign_shards(prompt_ids, group_size, num_critics, "response", seed=seed)
    check_partition(shards, len(prompt_ids) * group_size, num_critics)
    for prompt_index in range(len(prompt_ids)):
        rows = range(prompt_index * group_size, (prompt_index + 1) * group_size)
        for shard in shards:
            assert sum(row in rows for row in shard) == parts_per_critic
    assert assign_shards(prompt_ids, group_size, num_critics, "response", seed=seed) == shards


def test_response_split_shuffles_and_depends_on_seed():
    prompt_ids = [f"prompt-{i}" for i in range(20)]
    by_seed = [assign_shards(prompt_ids, 8, 2, "response", seed=seed) for seed in range(3)]
    assert by_seed[0] != by_seed[1] != by_seed[2]
    # A shuffle, not the identity split [first half, second half] for every prompt.
    identity = [[p * 8 + j for p in range(20) for j in range(4)], [p * 8 + j for p in range(20) for j in range(4, 8)]]
    assert by_seed[0] != identity


def test_prompt_shard_spreads_prompts():
    counts = [0, 0, 0, 0]
    for i in range(400):
        counts[prompt_shard(f"question/{i}", 4)] += 1
    assert all(60 < count < 140 for count in counts), counts


def test_assignment_is_stable_across_processes():
    prompt_ids = [f"gsm8k/{i}" for i in range(10)] + ["ünïcode ∑", ""]
    code = (
        "import json, sys; from asyppo.critics.sharding import assign_shards, prompt_shard; "
        "ids = json.loads(sys.argv[1]); "
        "print(json.dumps([[prompt_shard(i, 3) for i in ids], assign_shards(ids, 4, 3, 'prompt'), "
        "assign_shards(ids, 4, 2, 'response', seed=7)]))"
    )
    # A different PYTHONHASHSEED would change the builtin hash(); the assignment must not move.
    output = subprocess.run(
        [sys.executable, "-c", code, json.dumps(prompt_ids)],
        capture_output=True, text=True, check=True, env={**os.environ, "PYTHONHASHSEED": "12345"},
    ).stdout
    in_child = json.loads(output)
    here = [
        [prompt_shard(i, 3) for i in prompt_ids],
        assign_shards(prompt_ids, 4, 3, "prompt"),
        assign_shards(prompt_ids, 4, 2, "response", seed=7),
    ]
    assert in_child == here


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="group_size % num_critics"):
        assign_shards(["a", "b"], 3, 2, "response")
    with pytest.raises(ValueError, match="split must be"):
        assign_shards(["a"], 2, 2, "row")
    with pytest.raises(TypeError, match="prompt_ids\\[1\\]"):
        assign_shards(["a", 3], 2, 2)
    with pytest.raises(TypeError, match="single str"):
        assign_shards("abc", 2, 2)
    with pytest.raises(ValueError, match="num_critics"):
        prompt_shard("a", 0)
