"""Pure planning: batch arithmetic, schedules, sharding, DeepSpeed config, placement. No cluster."""

from __future__ import annotations

import json

import pytest

from orchestrator.plan.batches import (
    deepspeed_config,
    epoch_shard,
    eval_shard,
    lr_multiplier,
    micro_batch_indices,
    plan_batches,
)
from orchestrator.plan.placement import placement_problem
from orchestrator.spec import SpecError, spec_from_dict
from orchestrator.train.modeling import read_deepspeed_json


def test_plan_batches_arithmetic(job):
    spec = spec_from_dict(job(train={"epochs": 2, "micro_batch_size": 8, "gradient_accumulation_steps": 2},
                              scaling={"num_workers": 2}))
    plan = plan_batches(spec, 100)
    assert plan.examples_per_worker == 50 and plan.micro_batches_per_epoch == 7  # ceil(50 / 8)
    assert plan.global_batch_size == 32 and plan.total_steps == 7  # floor(2 epochs * 3.5 steps)
    assert plan.eval_every_steps == 3 and plan.checkpoint_every_steps == 3


def test_max_steps_wins_and_intervals_are_capped(job):
    spec = spec_from_dict(job(train={"epochs": None, "max_steps": 5, "eval_every_steps": 50}))
    plan = plan_batches(spec, 1000)
    assert plan.total_steps == 5 and plan.eval_every_steps == 5


def test_fewer_examples_than_workers_is_refused(job):
    with pytest.raises(SpecError, match="scaling.num_workers"):
        plan_batches(spec_from_dict(job(scaling={"num_workers": 4})), 3)


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_lr_schedule_warms_up_then_decays(kind):
    values = [lr_multiplier(step, 100, 10, kind) for step in range(100)]
    assert values[0] < values[5] < values[9] < values[10] == 1.0
    assert all(0 <= v <= 1 for v in values)
    if kind != "constant":
        assert values[99] < 0.05 and values == sorted(values[:11]) + sorted(values[11:], reverse=True)


@pytest.mark.parametrize("count, world", [(10, 1), (10, 2), (11, 3), (7, 4)])
def test_epoch_shards_are_equal_and_cover_the_data(count, world):
    shards = [epoch_shard(count, rank, world, epoch=3, seed=1).tolist() for rank in range(world)]
    assert len({len(s) for s in shards}) == 1
    assert set().union(*shards) == set(range(count))
    epoch_shard.cache_clear()  # the same shards computed afresh, not read back from the cache
    assert shards == [epoch_shard(count, rank, world, epoch=3, seed=1).tolist() for rank in range(world)]
    assert shards != [epoch_shard(count, rank, world, epoch=4, seed=1).tolist() for rank in range(world)] or count < 3


def test_an_epochs_permutation_is_computed_once_not_per_micro_step(job, monkeypatch):
    """The shuffle of all rows ran at every micro-step (480 ms per micro-batch at 1M rows): one per epoch now."""
    import numpy as np

    calls = []
    real = np.random.default_rng
    monkeypatch.setattr(np.random, "default_rng", lambda seed: calls.append(seed) or real(seed))
    epoch_shard.cache_clear()
    spec = spec_from_dict(job(train={"micro_batch_size": 4}, scaling={"num_workers": 1}))
    plan = plan_batches(spec, 40)  # 10 micro-batches per epoch
    steps = [micro_batch_indices(plan, 40, 0, step, 7) for step in range(30)]  # three epochs
    assert len(calls) == 3
    assert sorted(sum(steps[:10], [])) == list(range(40))  # each epoch still visits every row once


def test_fewer_rows_than_workers_still_gives_every_rank_a_row():
    assert [epoch_shard(1, rank, 4, 0, 0).tolist() for rank in range(4)] == [[0], [0], [0], [0]]


def test_micro_batches_walk_the_epochs(job):
    spec = spec_from_dict(job(train={"micro_batch_size": 4}, scaling={"num_workers": 2}))
    plan = plan_batches(spec, 16)  # 8 per worker: 2 micro-batches per epoch
    epoch0 = micro_batch_indices(plan, 16, 0, 0, 7) + micro_batch_indices(plan, 16, 0, 1, 7)
    assert epoch0 == epoch_shard(16, 0, 2, 0, 7).tolist()
    assert micro_batch_indices(plan, 16, 0, 2, 7) == epoch_shard(16, 0, 2, 1, 7)[:4].tolist()


def test_eval_shards_pad_with_minus_one():
    shards = [eval_shard(5, rank, 2) for rank in range(2)]
    assert shards == [[0, 2, 4], [1, 3, -1]]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_config_follows_the_spec(job, stage):
    spec = spec_from_dict(job(deepspeed={"zero_stage": stage, "offload_optimizer": True},
                              train={"gradient_accumulation_steps": 2, "precision": "bf16", "max_grad_norm": 0.5}))
    config = deepspeed_config(spec, plan_batches(spec, 64))
    assert config["zero_optimization"]["stage"] == stage
    assert config["train_batch_size"] == 2 * 16 * 2 and config["gradient_accumulation_steps"] == 2
    assert config["bf16"]["enabled"] and not config["fp16"]["enabled"] and config["gradient_clipping"] == 0.5
    assert config["optimizer"]["params"]["torch_adam"] is True  # CPU: no compiled kernels (where DeepSpeed reads it)
    assert ("offload_optimizer" in config["zero_optimization"]) == (stage > 0)


def test_user_deepspeed_json_wins_but_must_agree_on_batch(tmp_path, job):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 1}, "train_micro_batch_size_per_gpu": "auto"}))
    spec = spec_from_dict(job(deepspeed={"config": str(path)}))
    config = deepspeed_config(spec, plan_batches(spec, 64), read_deepspeed_json(str(path)))
    assert config["zero_optimization"] == {"stage": 1} and config["train_micro_batch_size_per_gpu"] == 16
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 3}))
    with pytest.raises(SpecError, match="deepspeed.config: train_micro_batch_size_per_gpu is 3"):
        deepspeed_config(spec, plan_batches(spec, 64), read_deepspeed_json(str(path)))
    path.write_text("{not json")
    with pytest.raises(SpecError, match="deepspeed.config: .* is not valid JSON"):
        read_deepspeed_json(str(path))


@pytest.mark.parametrize("workers, strategy, nodes, fits", [
    (2, "PACK", [{"CPU": 2}], True),
    (3, "PACK", [{"CPU": 2}], False),
    (3, "SPREAD", [{"CPU": 2}, {"CPU": 1}], True),
    (2, "STRICT_SPREAD", [{"CPU": 4}], False),
    (2, "STRICT_SPREAD", [{"CPU": 1}, {"CPU": 1}], True),
    (2, "STRICT_PACK", [{"CPU": 1}, {"CPU": 1}], False),
])
def test_placement(job, workers, strategy, nodes, fits):
    spec = spec_from_dict(job(scaling={"num_workers": workers, "placement_strategy": strategy}))
    problem = placement_problem(spec, nodes)
    assert (problem is None) == fits
    if problem:
        assert "scaling.num_workers" in problem and "CPU 1 per worker" in problem


def test_gpu_workers_need_gpus(job):
    spec = spec_from_dict(job(scaling={"use_gpu": True, "num_workers": 1}))
    assert "GPU 1 per worker (cluster total 0)" in placement_problem(spec, [{"CPU": 8}])


def test_placement_attempts_add_up_to_the_resource_wait_and_none_retries_forever():
    from orchestrator.plan.placement import placement_budget

    assert placement_budget(None) == (60.0, -1)  # Ray's default: retry placing forever
    assert placement_budget(30) == (30, 0)  # one attempt of 30 s, no retry
    attempt, retries = placement_budget(150)
    assert attempt == 60.0 and retries == 2  # 60 + 60 + 60 >= 150: three attempts in all
    for wait in (1, 59, 60, 61, 119, 600, 3601):
        attempt, retries = placement_budget(wait)
        assert attempt * (retries + 1) >= wait > attempt * retries


def test_a_cpu_workers_memory_share_is_the_tightest_node_split_among_the_workers_it_holds():
    from orchestrator.plan.placement import memory_share

    gib = 2**30
    per_worker = {"CPU": 1}
    # 4 workers: the 2-CPU node holds 2 of them (8 GiB each), the 8-CPU node all 4 (16 GiB / 4 = 4 GiB each)
    nodes = [{"CPU": 2, "memory": 16 * gib}, {"CPU": 8, "memory": 16 * gib}]
    assert memory_share(nodes, per_worker, 4) == 4 * gib
    assert memory_share(nodes, per_worker, 1) == 16 * gib  # one worker has a node's memory to itself
    assert memory_share([{"CPU": 0.5, "memory": gib}], per_worker, 2) is None  # no node holds a worker
    assert memory_share([{"CPU": 4}], per_worker, 2) is None  # the node does not say its memory
